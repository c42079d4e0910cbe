#!/usr/bin/env bash
# Two strata binaries on the Fly example's cold build (examples/fly-go), in interleaved rounds:
# each build on a fresh store holding only debian:12, with the build's own timings
# (STRATA_LOG=strata_build=debug): the apt-get RUN, the commit of its layer, the whole build.
# For a change to the build engine, where fly.sh compares strata with other builders.
# Needs root, network (debootstrap once, apt-get in the base's RUN), runc, debootstrap.
#
#   bench/build/fly-ab.sh OLD_BINARY NEW_BINARY [ROUNDS]   # ROUNDS defaults to 3
#
# DEBIAN_TAR=FILE reuses a debootstrap tarball (see scripts/fly-example/make-debian-base.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
[ $# -ge 2 ] || { echo "usage: $0 OLD_BINARY NEW_BINARY [ROUNDS]" >&2; exit 2; }
old=$(realpath "$1")
new=$(realpath "$2")
rounds=${3:-3}
work=$(mktemp -d /tmp/strata-bench-fly-ab.XXXXXX)
trap 'rm -rf "$work"' EXIT
tarball=${DEBIAN_TAR:-$work/debian12.tar}

echo "round binary total apt-run commit"
for i in $(seq "$rounds"); do
    # The second build of a round runs while the first's gigabyte is written back and deleted,
    # and took 1.7-3.5 s longer whichever binary it was: alternate who goes first.
    order="old new"
    [ $((i % 2)) -eq 0 ] && order="new old"
    for which in $order; do
        bin=${!which}
        # A new store path each time (see fly.sh: ext4 and recently freed inodes).
        store=$work/store-$which-$(date +%s%N)
        STRATA_STORE=$store DEBIAN_TAR=$tarball scripts/fly-example/make-debian-base.sh "$bin" \
            >"$work/import.log" 2>&1 || { cat "$work/import.log" >&2; exit 1; }
        rm -rf "$work/proj"
        cp -a "$repo/examples/fly-go" "$work/proj"
        rm -f "$work/proj/strata.lock"
        t0=$(date +%s.%N)
        (cd "$work/proj" && STRATA_LOG=strata_build=debug "$bin" --store "$store" build --progress plain) \
            >"$work/log" 2>&1
        total=$(python3 -c "print(round($(date +%s.%N) - $t0, 2))")
        ran=$(grep -m1 -o 'ran in [0-9.]*m\?s' "$work/log" | cut -d' ' -f3)
        commit=$(grep -m1 -o 'uncompressed) written in [0-9.]*m\?s' "$work/log" | cut -d' ' -f4)
        echo "$i $which $total $ran $commit"
        rm -rf "$store"
    done
done
