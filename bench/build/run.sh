#!/usr/bin/env bash
# Build benchmark: strata vs `buildah bud --layers` on examples/tilt-base-image (two images:
# tilt-base from package/ with base.Dockerfile, tilt-app FROM tilt-base with Dockerfile).
# Scenarios: cold build, no-op rebuild, one-file app change (a line appended to src/index.js).
# Needs root, runc, buildah, hyperfine, busybox-static. Prints hyperfine tables and writes
# JSON results to $OUT (default bench/build/out/).
#
#   bench/build/run.sh [RUNS]        # RUNS per scenario, default 10 (cold: RUNS/2)
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
runs=${1:-10}
cold_runs=$(( runs / 2 > 3 ? runs / 2 : 3 ))
out=${OUT:-$repo/bench/build/out}
mkdir -p "$out"

for t in buildah hyperfine runc; do
    command -v "$t" >/dev/null || { echo "needs $t (apt-get install $t)" >&2; exit 1; }
done
target=${CARGO_TARGET_DIR:-$repo/target}
strata=${STRATA:-$target/release/strata}
if [ ! -x "$strata" ]; then
    cargo build --release -q -p strata
fi

# Lowercase only: buildah names an image pulled from `oci:DIR:TAG` after DIR, and image names
# must be lowercase (mktemp's XXXXXX has capitals: "repository name must be lowercase").
work=/tmp/strata-bench-build-$$-$(date +%s%N | sha256sum | head -c 8)
mkdir -m 700 "$work"
trap 'rm -rf "$work"' EXIT

# A busybox root filesystem, as scripts/main-job makes it.
mkdir -p "$work/rootfs/bin" "$work/rootfs/etc" "$work/rootfs/tmp"
chmod 1777 "$work/rootfs/tmp"
cp /bin/busybox "$work/rootfs/bin/"
for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$work/rootfs/bin/$applet"
done
echo 'root:x:0:0:root:/root:/bin/sh' >"$work/rootfs/etc/passwd"
echo 'root:x:0:' >"$work/rootfs/etc/group"
tar -C "$work/rootfs" -cf "$work/rootfs.tar" .

# One copy of the project per builder, so the edits of one never reach the other mid-run.
for b in strata buildah; do
    cp -a "$repo/examples/tilt-base-image" "$work/$b-proj"
done
# buildah has no strata.toml: the app image's `ignore` list becomes a .dockerignore.
printf 'package\nstrata.toml\nstrata.lock\n*.Dockerfile\n' >"$work/buildah-proj/.dockerignore"

export STRATA_STORE=$work/store
S="$strata --store $work/store"
# buildah's default storage driver on this machine (overlay on ext4); chroot isolation (no runc).
B="buildah --root $work/broot --runroot $work/brunroot --storage-driver overlay"
BUD="$B bud --pull-never --layers --isolation chroot -q"

strata_reset() { # an empty store with only busybox, and no strata.lock (a fresh checkout)
    # The lock must go: `strata import` stamps the time into the config, so the re-imported
    # busybox has a new digest and the old lock would send strata to pull the locked one.
    rm -rf "$work/store" "$work/strata-proj/strata.lock"
    $S import "$work/rootfs.tar" busybox >/dev/null
}
buildah_reset() { # an empty buildah storage with only localhost/busybox:latest
    $B rm -a >/dev/null 2>&1 || true
    rm -rf "$work/broot" "$work/brunroot"
    $B pull -q "oci:$work/store:busybox:latest" >/dev/null
    $B tag "$($B images -q | head -1)" localhost/busybox:latest
}
strata_reset
buildah_reset
declare -f strata_reset buildah_reset >"$work/fns.sh"
{ echo "S='$S'"; echo "B='$B'"; echo "work='$work'"; } >>"$work/fns.sh"

strata_build="cd $work/strata-proj && $S build --progress plain >/dev/null 2>&1"
buildah_build="cd $work/buildah-proj && $BUD -t tilt-base -f base.Dockerfile package >/dev/null && $BUD -t tilt-app -f Dockerfile . >/dev/null"
echo "strata:  $strata_build"
echo "buildah: $buildah_build"

hf() { hyperfine --shell=bash --style basic "$@"; }
uptime

echo "==> cold build (empty cache, busybox only)"
hf --runs "$cold_runs" --export-json "$out/cold.json" \
    --prepare "source $work/fns.sh; strata_reset" -n strata "$strata_build" \
    --prepare "source $work/fns.sh; buildah_reset" -n buildah "$buildah_build"

echo "==> no-op rebuild (nothing changed)"
hf --runs "$runs" --warmup 1 --export-json "$out/noop.json" \
    -n strata "$strata_build" -n buildah "$buildah_build"

echo "==> one-file app change (a line appended to src/index.js)"
hf --runs "$runs" --warmup 1 --export-json "$out/app-change.json" \
    --prepare "echo \"// \$RANDOM\$RANDOM\" >> $work/strata-proj/src/index.js" -n strata "$strata_build" \
    --prepare "echo \"// \$RANDOM\$RANDOM\" >> $work/buildah-proj/src/index.js" -n buildah "$buildah_build"

# Where an incremental rebuild's time goes: each step's own duration (--progress json) against
# the wall time, for the "RUN + 50 ms" target (3 rebuilds, one line appended each time).
echo "==> step timings of app-change rebuilds (--progress json)"
for i in 1 2 3; do
    echo "// t$i $RANDOM" >>"$work/strata-proj/src/index.js"
    start=$(date +%s%N)
    (cd "$work/strata-proj" && $S build --progress json 2>"$work/events.json" >/dev/null)
    end=$(date +%s%N)
    python3 - "$work/events.json" $(( (end - start) / 1000000 )) <<'EOF2'
import json, sys
ev = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
steps = [(e["step"]["image"], e["step"]["text"][:40], e["duration"]) for e in ev if e["event"] == "step_done"]
run = sum(d for _, t, d in steps if t.startswith("RUN"))
print(f"wall {sys.argv[2]} ms; steps run: " + ", ".join(f"{t} {d*1000:.0f} ms" for _, t, d in steps)
      + f"; wall - RUN = {int(sys.argv[2]) - run*1000:.0f} ms")
EOF2
done
uptime

python3 - "$out" <<'EOF'
import json, sys, statistics
out = sys.argv[1]
print("\n| scenario | strata median | buildah median | buildah / strata |")
print("|---|---|---|---|")
for name in ["cold", "noop", "app-change"]:
    r = {x["command"]: x for x in json.load(open(f"{out}/{name}.json"))["results"]}
    s, b = statistics.median(r["strata"]["times"]), statistics.median(r["buildah"]["times"])
    print(f"| {name} | {s*1000:.0f} ms | {b*1000:.0f} ms | {b/s:.1f}x |")
EOF
