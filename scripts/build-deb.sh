#!/usr/bin/env bash
# Build the Debian package lpd-relay_<version>_<arch>.deb into dist/ (`make deb`).
#
#   bash scripts/build-deb.sh [--dist DIR] [--no-lintian]
#
# 1. the build dependencies (scripts/install-deb-deps.sh: apt-get when root);
# 2. the generated inputs: `make man` and `make completions`, and the systemd
#    unit and snippets in deploy/systemd/ - a missing one stops the build with
#    its name;
# 3. the pinned wheels of debian/requirements*.txt from PyPI into
#    build/deb/wheelhouse (kept between builds), with a build venv of Debian's
#    own python3.11, so that the package build itself is offline;
# 4. a clean copy of the tree (the files git knows or would add) in
#    build/deb/src/, and dpkg-buildpackage -b there (debian/rules);
# 5. lintian on the result (errors fail the build), then the .deb into DIR.
# docs/packaging.md says why the package is made this way.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DIST=dist
LINTIAN=yes
while [ $# -gt 0 ]; do
    case $1 in
        --dist) DIST=$2; shift 2 ;;
        --no-lintian) LINTIAN=no; shift ;;
        *) echo "usage: $0 [--dist DIR] [--no-lintian]" >&2; exit 2 ;;
    esac
done
WORK=$ROOT/build/deb
PY=/usr/bin/python3.11
MAKE=${MAKE:-make}

say() { printf 'build-deb: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

check_version() {
    local py deb
    py=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' relay/__init__.py)
    deb=$(dpkg-parsechangelog -S Version)
    [ "$py" = "$deb" ] || die "relay/__init__.py says version $py, debian/changelog says $deb: add a debian/changelog entry for $py"
    VERSION=$deb
}

# `make -n` names a missing target in its own words; catch exactly that.
make_target() {
    local target=$1 err
    err=$(LC_ALL=C $MAKE -n "$target" 2>&1 >/dev/null) || {
        if grep -q "No rule to make target '$target'" <<<"$err"; then
            die "the Makefile has no '$target' target, which the package needs (it writes $2)"
        fi
    }
    $MAKE -s "$target" >&2 || die "'make $target' failed"
}

generated_inputs() {
    local f
    for f in deploy/systemd/lpd-relay.service deploy/systemd/lpd-relay.sysusers \
             deploy/systemd/lpd-relay.tmpfiles; do
        [ -f "$f" ] || die "$f is missing: the package installs it (debian/${f##*/} points at it)"
    done
    make_target man "build/man/lpd-relay.8 and build/man/lpd-relay.toml.5"
    make_target completions "build/completions/lpd-relay.bash and build/completions/_lpd-relay"
    for f in build/man/lpd-relay.8 build/man/lpd-relay.toml.5 \
             build/completions/lpd-relay.bash build/completions/_lpd-relay; do
        [ -s "$f" ] || die "$f was not written by 'make ${f#build/}'"
    done
}

# Wheels only (--only-binary), every one pinned (--no-deps: a dependency that
# is not pinned makes the offline install in debian/rules fail by name).
fetch_wheels() {
    if ! "$WORK/tools/bin/python" -m pip --version >/dev/null 2>&1; then
        rm -rf "$WORK/tools"
        "$PY" -m venv "$WORK/tools"
    fi
    "$WORK/tools/bin/python" -m pip download -q --disable-pip-version-check --no-input \
        --only-binary=:all: --no-deps -d "$WORK/wheelhouse" \
        -r debian/requirements.txt -r debian/requirements-build.txt >&2
}

# The files git tracks or would add (untracked, not ignored); outside git,
# the tree without its build outputs.
copy_tree() {
    local dest=$1
    rm -rf "$WORK/src"
    mkdir -p "$dest"
    if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git ls-files -z --cached --others --exclude-standard |
            while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
            tar --null -T - -cf - | tar -xf - -C "$dest"
    else
        tar --exclude=./.venv --exclude=./build --exclude=./dist --exclude-vcs -cf - . |
            tar -xf - -C "$dest"
    fi
    mkdir -p "$dest/build"
    cp -r build/man build/completions "$dest/build/"
    copy_pinned_wheels "$dest/debian/wheelhouse"
}

# Only the pinned wheels go into the package build, whatever else an older
# pin left in the wheelhouse.
copy_pinned_wheels() {
    local dest=$1 line name version wheel base
    mkdir -p "$dest"
    while IFS= read -r line; do
        line=${line%%#*}
        [[ $line == *==* ]] || continue
        name=$(tr 'A-Z.-' 'a-z__' <<<"${line%%==*}" | tr -d ' ')
        version=$(tr -d ' ' <<<"${line##*==}")
        for wheel in "$WORK/wheelhouse"/*.whl; do
            base=$(tr 'A-Z' 'a-z' <<<"${wheel##*/}")
            if [[ $base == "$name-$version-"* ]]; then cp "$wheel" "$dest/"; fi
        done
    done < <(cat debian/requirements.txt debian/requirements-build.txt)
}

main() {
    bash scripts/install-deb-deps.sh || die "build dependencies missing (see above)"
    check_version
    generated_inputs
    mkdir -p "$WORK"
    say "fetching the pinned wheels"
    fetch_wheels
    local src=$WORK/src/lpd-relay-$VERSION arch deb log=$WORK/build.log
    copy_tree "$src"
    arch=$(dpkg-architecture -qDEB_HOST_ARCH)
    say "building lpd-relay $VERSION for $arch (log: ${log#"$ROOT"/})"
    if ! (cd "$src" && DEB_BUILD_OPTIONS="${DEB_BUILD_OPTIONS:-noautodbgsym}" \
            dpkg-buildpackage -b -us -uc) >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        die "dpkg-buildpackage failed (whole log: ${log#"$ROOT"/})"
    fi
    deb=$WORK/src/lpd-relay_${VERSION}_${arch}.deb
    if [ "$LINTIAN" = yes ]; then
        say "lintian"
        lintian --fail-on error --info "$deb" >&2 || die "lintian found errors in $deb"
    fi
    mkdir -p "$DIST"
    cp "$deb" "$DIST/"
    say "$DIST/${deb##*/}: $(du -k "$deb" | cut -f1) KiB"
}

main
