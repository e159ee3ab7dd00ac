#!/usr/bin/env bash
# Install the real LPD peers the test suite talks to (Debian/Ubuntu).
#
# Packages: lprng (lpd lpr lpq lprm checkpc), rlpr, p910nd, prometheus
# (promtool + server), socat, nftables, stunnel4 (TLS in front of LPRng),
# haproxy (PROXY protocol). Only the missing ones are installed,
# with --no-install-recommends and a temporary policy-rc.d so that no system
# service starts; --no-remove makes apt abort rather than remove a conflicting
# package (lprng conflicts with lpr and cups-bsd). A pre-existing policy-rc.d
# is put back exactly as it was.
#
# This never fails the build: without root or apt-get it says what is missing
# and why, exits 0, and the tests that need a missing peer are skipped.
# Quick and idempotent when everything is present (dpkg-query only).
set -u

PACKAGES=(lprng rlpr p910nd prometheus socat nftables stunnel4 haproxy)
declare -A COMMANDS=(
    [lprng]="lpd lpr lpq lprm checkpc"
    [rlpr]="rlpr"
    [p910nd]="p910nd"
    [prometheus]="promtool prometheus"
    [socat]="socat"
    [nftables]="nft"
    [stunnel4]="stunnel4"
    [haproxy]="haproxy"
)
POLICY=/usr/sbin/policy-rc.d
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

say() { printf 'install-peers: %s\n' "$*"; }

# A package counts as present when dpkg has it installed (or, without dpkg,
# when all of its commands are on PATH).
is_present() {
    local pkg=$1 cmd
    if command -v dpkg-query >/dev/null 2>&1; then
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q ' installed$'
        return
    fi
    for cmd in ${COMMANDS[$pkg]}; do
        command -v "$cmd" >/dev/null 2>&1 || return 1
    done
}

missing_packages() {
    local pkg
    for pkg in "${PACKAGES[@]}"; do
        is_present "$pkg" || printf '%s\n' "$pkg"
    done
}

# Installed but a command is not found (e.g. removed by hand): tell, do not fix.
warn_missing_commands() {
    local pkg cmd
    for pkg in "${PACKAGES[@]}"; do
        is_present "$pkg" || continue
        for cmd in ${COMMANDS[$pkg]}; do
            command -v "$cmd" >/dev/null 2>&1 || say "warning: $pkg is installed but '$cmd' is not found"
        done
    done
}

POLICY_BACKUP=""
POLICY_TMPDIR=""

# Block service starts during the install: invoke-rc.d asks policy-rc.d, and
# exit code 101 means "action forbidden".
block_service_starts() {
    POLICY_TMPDIR=$(mktemp -d) || return 1
    if [ -e "$POLICY" ] || [ -L "$POLICY" ]; then
        POLICY_BACKUP="$POLICY_TMPDIR/policy-rc.d"
        cp -a "$POLICY" "$POLICY_BACKUP" || return 1
    fi
    trap restore_policy EXIT INT TERM
    printf '#!/bin/sh\n# written by install-peers.sh for the duration of the install\nexit 101\n' >"$POLICY.install-peers" &&
        chmod 755 "$POLICY.install-peers" &&
        mv -f "$POLICY.install-peers" "$POLICY"
}

restore_policy() {
    if [ -n "$POLICY_BACKUP" ]; then
        mv -f "$POLICY_BACKUP" "$POLICY"   # same file, mode, owner and times
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

# Install, and when apt has no package lists yet (fresh image), update once
# and retry once.
install_packages() {
    local log status
    log=$(mktemp) || return 1
    apt_install "$@" 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    if [ "$status" -ne 0 ] && grep -qE 'Unable to locate package|has no installation candidate|is not available' "$log"; then
        say "apt has no package lists for: $*; running apt-get update and retrying once"
        DEBIAN_FRONTEND=noninteractive apt-get update -q && apt_install "$@"
        status=$?
    fi
    rm -f "$log"
    return "$status"
}

main() {
    local missing
    mapfile -t missing < <(missing_packages)
    if [ "${#missing[@]}" -eq 0 ]; then
        say "all peers present (${PACKAGES[*]})"
        warn_missing_commands
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        say "missing: ${missing[*]} - not root, so not installing them; tests that need them will be skipped (run this script as root to install)"
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        say "missing: ${missing[*]} - no apt-get on this system, so not installing them; tests that need them will be skipped"
        return 0
    fi
    say "installing: ${missing[*]}"
    if block_service_starts && install_packages "${missing[@]}"; then
        restore_policy
        mapfile -t missing < <(missing_packages)
    else
        restore_policy
        say "apt-get could not install them (see above)"
    fi
    if [ "${#missing[@]}" -eq 0 ]; then
        say "all peers present"
    else
        say "still missing: ${missing[*]} - tests that need them will be skipped"
    fi
    warn_missing_commands
    return 0
}

main "$@"
exit 0
