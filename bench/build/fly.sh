#!/usr/bin/env bash
# Build benchmark: strata vs `buildah bud --layers` on examples/fly-go (the Fly.io Go guide's
# app on a Debian 12 base that installs golang with apt-get). Scenarios: cold build (a store /
# buildah storage holding only debian:12), no-op rebuild, one-line change of main.go.
# Needs root, network (debootstrap once, apt-get in the base's RUN), runc, buildah, hyperfine,
# debootstrap. Prints hyperfine tables and writes JSON results to $OUT (default bench/build/out/).
#
#   bench/build/fly.sh [RUNS]    # RUNS for no-op and change (default 5); cold: COLD_RUNS (2)
#   PAIRS=N bench/build/fly.sh   # only cold builds, N interleaved strata/buildah pairs
#   PAIRS=N BUILDKIT=1 bench/build/fly.sh   # the same with BuildKit in each round (Debian's
#                                # docker.io 20.10, DOCKER_BUILDKIT=1, a private dockerd)
#
# DEBIAN_TAR=FILE reuses a debootstrap tarball (see scripts/fly-example/make-debian-base.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
runs=${1:-5}
cold_runs=${COLD_RUNS:-2}
out=${OUT:-$repo/bench/build/out}
mkdir -p "$out"

for t in buildah hyperfine runc debootstrap; do
    command -v "$t" >/dev/null || { echo "needs $t (apt-get install $t)" >&2; exit 1; }
done
target=${CARGO_TARGET_DIR:-$repo/target}
strata=${STRATA:-$target/release/strata}
if [ ! -x "$strata" ]; then
    cargo build --release -q -p strata
fi

# Lowercase only: buildah names an image pulled from `oci:DIR:TAG` after DIR.
work=/tmp/strata-bench-fly-$$-$(date +%s%N | sha256sum | head -c 8)
mkdir -m 700 "$work"
trap 'rm -rf "$work" || true' EXIT
tarball=${DEBIAN_TAR:-$work/debian12.tar}
# The reference store holds debian:12 only (debootstrap once; later runs import the tarball).
STRATA_STORE=$work/ref DEBIAN_TAR=$tarball scripts/fly-example/make-debian-base.sh "$strata" >/dev/null

for b in strata buildah; do
    cp -a "$repo/examples/fly-go" "$work/$b-proj"
    rm -f "$work/$b-proj/strata.lock"
done
printf 'strata.toml\nstrata.lock\n*.Dockerfile\n' >"$work/buildah-proj/.dockerignore"

# The store is a path that changes every round (`$work/store-path` names it): a store deleted and
# made again at the same path gets its new inodes where ext4 just freed ~30k, and allocating
# each one then scans the recently deleted ones (`recently_deleted` in the kernel: 60 s), which
# doubled dpkg's time in the timed RUN. A new directory does not meet them, as a user's store
# does not.
S="$strata --store \$(cat $work/store-path)"
# buildah's default storage driver here (overlay on ext4), its chroot isolation (no runc
# container per RUN), host network for apt-get like strata's default.
B="buildah --root $work/broot --runroot $work/brunroot --storage-driver overlay"
BUD="$B bud --pull-never --layers --isolation chroot --network host -q"

strata_reset() { # a fresh store with only debian:12 (imported again, not timed)
    local old new
    old=$(cat "$work/store-path" 2>/dev/null || true)
    new=$work/store-$(date +%s%N)
    rm -rf "$work/strata-proj/strata.lock" ${old:+"$old"}
    STRATA_STORE=$new DEBIAN_TAR=$tarball "$repo/scripts/fly-example/make-debian-base.sh" "$strata" >/dev/null
    echo "$new" >"$work/store-path"
}
buildah_reset() { # buildah storage with only localhost/debian:12
    $B rm -a >/dev/null 2>&1 || true
    $B rmi -a -f >/dev/null 2>&1 || true
    # RUN --mount=type=cache lives outside --root in buildah 1.28 (/var/tmp/buildah-cache).
    rm -rf "$work/broot" "$work/brunroot" /var/tmp/buildah-cache
    $B pull -q "oci:$work/ref:debian:12" >/dev/null
    $B tag "$($B images -q | head -1)" localhost/debian:12
}
strata_reset
buildah_reset
builders="strata buildah"
D="/usr/bin/docker"
buildkit_reset() { # the engine keeps debian:12 only, and no build cache
    $D rmi -f go-fly-a-site-base go-fly-a-site >/dev/null 2>&1 || true
    $D builder prune -af >/dev/null 2>&1 || true
}
if [ -n "${BUILDKIT:-}" ]; then
    builders="strata buildkit buildah"
    cp -a "$repo/examples/fly-go" "$work/buildkit-proj"
    printf 'strata.toml\nstrata.lock\n*.Dockerfile\n' >"$work/buildkit-proj/.dockerignore"
    sock=$work/docker.sock
    dockerd --iptables=false --bridge=none --host "unix://$sock" --data-root "$work/docker" \
        --exec-root "$work/docker-exec" --pidfile "$work/docker.pid" >"$work/dockerd.log" 2>&1 &
    dockerd_pid=$!
    trap 'set +e; kill $dockerd_pid; wait $dockerd_pid 2>/dev/null; umount -R "$work/docker" 2>/dev/null; rm -rf "$work"' EXIT
    export DOCKER_HOST=unix://$sock DOCKER_BUILDKIT=1
    for _ in $(seq 100); do $D info >/dev/null 2>&1 && break; sleep 0.2; done
    $strata --store "$work/ref" save debian:12 -o "$work/debian-save.tar"
    $D load -i "$work/debian-save.tar" >/dev/null
fi
declare -f strata_reset buildah_reset buildkit_reset >"$work/fns.sh"
{ echo "S='$S'"; echo "B='$B'"; echo "D='$D'"; echo "work='$work'"; echo "repo='$repo'"; echo "tarball='$tarball'"; echo "strata='$strata'"; } >>"$work/fns.sh"

strata_build="cd $work/strata-proj && $S build --progress plain >/dev/null 2>&1"
buildah_build="cd $work/buildah-proj && $BUD -t go-fly-a-site-base -f base.Dockerfile . >/dev/null && $BUD -t go-fly-a-site -f Dockerfile . >/dev/null"
echo "strata:  $strata_build"
echo "buildah: $buildah_build"
buildkit_build="cd $work/buildkit-proj && $D build -q --network host -t go-fly-a-site-base -f base.Dockerfile . >/dev/null && $D build -q --network host -t go-fly-a-site -f Dockerfile . >/dev/null"
[ -n "${BUILDKIT:-}" ] && echo "buildkit: DOCKER_BUILDKIT=1 $buildkit_build"
uptime

hf() { hyperfine --shell=bash --style basic "$@"; }

if [ -n "${PAIRS:-}" ]; then
    # Cold builds in interleaved pairs (strata, buildah, strata, ...): apt-get downloads from
    # the Debian mirror in both, and the mirror's speed drifts over minutes, so back-to-back
    # pairs compare the builders under the same network better than hyperfine's N-then-N.
    echo "==> cold build, $PAIRS interleaved pairs"
    : >"$out/fly-cold-pairs.txt"
    for i in $(seq "$PAIRS"); do
        for b in $builders; do
            (source "$work/fns.sh"; "${b}_reset")
            cmd_var="${b}_build"
            cmd=${!cmd_var}
            t0=$(date +%s.%N)
            bash -c "$cmd"
            t=$(python3 -c "import sys; print(round($(date +%s.%N) - $t0, 2))")
            echo "$i $b $t" | tee -a "$out/fly-cold-pairs.txt"
        done
    done
    uptime
    python3 - "$out/fly-cold-pairs.txt" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
t = {b: [float(x) for _, bb, x in rows if bb == b] for b in ("strata", "buildkit", "buildah")}
s = statistics.median(t["strata"])
print(f"strata   median {s:.1f} s  {sorted(round(x, 1) for x in t['strata'])}")
for peer in ("buildkit", "buildah"):
    if not t[peer]:
        continue
    p = statistics.median(t[peer])
    ratios = [a / b for a, b in zip(t["strata"], t[peer])]
    print(f"{peer:8} median {p:.1f} s  {sorted(round(x, 1) for x in t[peer])}")
    print(f"  strata / {peer}: ratio of medians {s / p:.2f}x; median of per-round ratios "
          f"{statistics.median(ratios):.2f}x")
EOF
    exit 0
fi

echo "==> cold build (debian:12 only)"
hf --runs "$cold_runs" --export-json "$out/fly-cold.json" \
    --prepare "source $work/fns.sh; strata_reset" -n strata "$strata_build" \
    --prepare "source $work/fns.sh; buildah_reset" -n buildah "$buildah_build"

echo "==> no-op rebuild"
hf --runs "$runs" --warmup 1 --export-json "$out/fly-noop.json" \
    -n strata "$strata_build" -n buildah "$buildah_build"

echo "==> one-line change of main.go (the greeting)"
change() { echo "sed -i \"/Fprintln/s/Hello, world![^\\\"]*/Hello, world! \$RANDOM/\" $work/$1-proj/main.go"; }
hf --runs "$runs" --warmup 1 --export-json "$out/fly-change.json" \
    --prepare "$(change strata)" -n strata "$strata_build" \
    --prepare "$(change buildah)" -n buildah "$buildah_build"

echo "==> step timings of one strata change rebuild (--progress json)"
eval "$(change strata)"
(cd "$work/strata-proj" && $strata --store "$(cat "$work/store-path")" build --progress json 2>&1 >/dev/null | grep -E '"step_done"|"image_done"')
uptime

python3 - "$out" <<'EOF'
import json, sys, statistics
out = sys.argv[1]
print("\n| scenario | strata median | buildah median | strata / buildah |")
print("|---|---|---|---|")
for name in ["fly-cold", "fly-noop", "fly-change"]:
    r = {x["command"]: x for x in json.load(open(f"{out}/{name}.json"))["results"]}
    s, b = statistics.median(r["strata"]["times"]), statistics.median(r["buildah"]["times"])
    print(f"| {name} | {s:.3f} s | {b:.3f} s | {s/b:.2f}x |")
EOF
