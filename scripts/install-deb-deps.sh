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
# says what is missing (exit 1) and installs nothing.
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

POLICY_BACKUP=""
POLICY_TMPDIR=""

# invoke-rc.d asks policy-rc.d before starting a service; 101 = "forbidden".
block_service_starts() {
    POLICY_TMPDIR=$(mktemp -d) || return 1
    if [ -e "$POLICY" ] || [ -L "$POLICY" ]; then
        POLICY_BACKUP="$POLICY_TMPDIR/policy-rc.d"
        cp -a "$POLICY" "$POLICY_BACKUP" || return 1
    fi
    trap restore_policy EXIT INT TERM
    printf '#!/bin/sh\n# written by install-deb-deps.sh for the duration of the install\nexit 101\n' \
        >"$POLICY.install-deb-deps" &&
        chmod 755 "$POLICY.install-deb-deps" &&
        mv -f "$POLICY.install-deb-deps" "$POLICY"
}

restore_policy() {
    if [ -n "$POLICY_BACKUP" ]; then
        mv -f "$POLICY_BACKUP" "$POLICY"
    else
        rm -f "$POLICY"
    fi
    [ -n "$POLICY_TMPDIR" ] && rm -rf "$POLICY_TMPDIR"
    POLICY_BACKUP="" POLICY_TMPDIR=""
    trap - EXIT INT TERM
}

apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        --no-remove -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@"
}

# When apt has no package lists yet (fresh image): update once, retry once.
install_packages() {
    local log status
    log=$(mktemp) || return 1
    apt_install "$@" 2>&1 | tee "$log" >&2
    status=${PIPESTATUS[0]}
    if [ "$status" -ne 0 ] && grep -qE 'Unable to locate package|has no installation candidate|is not available' "$log"; then
        say "apt has no package lists for: $*; running apt-get update and retrying once"
        DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 && apt_install "$@" >&2
        status=$?
    fi
    rm -f "$log"
    return "$status"
}

main() {
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
