#!/usr/bin/env bash
# Install what `make deb` needs to build and check the Debian package (Debian 12).
#
# Packages: debhelper (dh and its dh_installsystemd / dh_installsysusers /
# dh_installtmpfiles), dpkg-dev, build-essential and python3-dev (to compile
# the Cython core against Debian's own python3.11), python3-venv (the venv
# under /usr/lib/lpd-relay is made at build time with Debian's python3.11) and
# lintian (the package test checks the result with it). Only the missing ones
# are installed, with --no-install-recommends and a temporary policy-rc.d so
# that no system service starts; --no-remove makes apt abort rather than
# remove a package. A pre-existing policy-rc.d is put back exactly as it was;
# apt-get update runs once, only when apt has no package lists for them.
#
# Unlike scripts/install-peers.sh this fails (exit 1) when something is still
# missing: the package cannot be built without these. With --check it only
# says what is missing (exit 1) and installs nothing. With --optional (what
# `make test` uses) it never fails: whatever is still missing is named, and
# the package tests skip with that reason.
set -u

PACKAGES=(debhelper dpkg-dev build-essential python3-dev python3-venv lintian)
POLICY=/usr/sbin/policy-rc.d
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

say() { printf 'install-deb-deps: %s\n' "$*" >&2; }

is_present() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q ' installed$'
}

missing_packages() {
    local pkg
    for pkg in "${PACKAGES[@]}"; do
        is_present "$pkg" || printf '%s\n' "$pkg"
    done
}

APT_TAG=install-deb-deps
# shellcheck source=scripts/apt-lib.sh
. "$(dirname "$0")/apt-lib.sh"

main() {
    if [ "${1:-}" = "--optional" ]; then
        main_strict || say "the package tests will be skipped"
        return 0
    fi
    main_strict "$@"
}

main_strict() {
    local missing
    if ! command -v dpkg-query >/dev/null 2>&1; then
        say "no dpkg on this system: a Debian package is built on Debian (12 or later)"
        return 1
    fi
    mapfile -t missing < <(missing_packages)
    if [ "${#missing[@]}" -eq 0 ]; then
        return 0
    fi
    if [ "${1:-}" = "--check" ]; then
        say "missing: ${missing[*]}"
        return 1
    fi
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        say "missing: ${missing[*]} - install them (as root: bash scripts/install-deb-deps.sh)"
        return 1
    fi
    say "installing: ${missing[*]}"
    if block_service_starts && install_packages "${missing[@]}"; then
        restore_policy
    else
        restore_policy
        say "apt-get could not install them (see above)"
    fi
    mapfile -t missing < <(missing_packages)
    if [ "${#missing[@]}" -ne 0 ]; then
        say "still missing: ${missing[*]}"
        return 1
    fi
    return 0
}

main "$@"
