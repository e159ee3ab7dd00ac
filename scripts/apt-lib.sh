# Shared by scripts/install-peers.sh and scripts/install-deb-deps.sh (sourced,
# not run): install Debian packages without starting any service.
#
# The caller sets POLICY (the policy-rc.d path), APT_TAG (its own name, for the
# temporary policy file) and defines say(). While packages install, a
# temporary policy-rc.d answers 101 ("action forbidden") to invoke-rc.d, so no
# system service starts; a pre-existing policy-rc.d is put back exactly as it
# was. --no-remove makes apt abort rather than remove a conflicting package.

POLICY_BACKUP=""
POLICY_TMPDIR=""

block_service_starts() {
    POLICY_TMPDIR=$(mktemp -d) || return 1
    if [ -e "$POLICY" ] || [ -L "$POLICY" ]; then
        POLICY_BACKUP="$POLICY_TMPDIR/policy-rc.d"
        cp -a "$POLICY" "$POLICY_BACKUP" || return 1
    fi
    trap restore_policy EXIT INT TERM
    printf '#!/bin/sh\n# written by %s for the duration of the install\nexit 101\n' "$APT_TAG" \
        >"$POLICY.$APT_TAG" &&
        chmod 755 "$POLICY.$APT_TAG" &&
        mv -f "$POLICY.$APT_TAG" "$POLICY"
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

# Install; when apt has no package lists yet (fresh image), update once and
# retry once. apt's output goes to stderr, so a caller's stdout stays its own.
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
