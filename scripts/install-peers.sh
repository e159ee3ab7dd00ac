#!/usr/bin/env bash
# Install the real LPD peers the test suite talks to (Debian/Ubuntu).
#
# Packages: lprng (lpd lpr lpq lprm checkpc), rlpr, p910nd, prometheus
# (promtool + server), socat, nftables, stunnel4 (TLS in front of LPRng),
# haproxy (PROXY protocol), rsyslog + rsyslog-gnutls (the audit log's syslog
# collector over TCP and TLS; never started as a service), postgresql (the
# shared spool: the tests run private clusters with its initdb/pg_ctl). Only the missing ones are installed,
# with --no-install-recommends and a temporary policy-rc.d so that no system
# service starts; --no-remove makes apt abort rather than remove a conflicting
# package (lprng conflicts with lpr and cups-bsd). A pre-existing policy-rc.d
# is put back exactly as it was.
#
# This never fails the build: without root or apt-get it says what is missing
# and why, exits 0, and the tests that need a missing peer are skipped.
# Quick and idempotent when everything is present (dpkg-query only).
set -u

PACKAGES=(lprng rlpr p910nd prometheus socat nftables stunnel4 haproxy rsyslog rsyslog-gnutls
          postgresql)
declare -A COMMANDS=(
    [lprng]="lpd lpr lpq lprm checkpc"
    [rlpr]="rlpr"
    [p910nd]="p910nd"
    [prometheus]="promtool prometheus"
    [socat]="socat"
    [nftables]="nft"
    [stunnel4]="stunnel4"
    [haproxy]="haproxy"
    [rsyslog]="rsyslogd"
    [rsyslog-gnutls]=""
    [postgresql]="psql"
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

APT_TAG=install-peers
# shellcheck source=scripts/apt-lib.sh
. "$(dirname "$0")/apt-lib.sh"

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
