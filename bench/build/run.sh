#!/usr/bin/env bash
# Build benchmark: strata vs `buildah bud --layers` on examples/tilt-base-image (two images:
# tilt-base from package/ with base.Dockerfile, tilt-app FROM tilt-base with Dockerfile).
# Scenarios: cold build, no-op rebuild, one-file app change (a line appended to src/index.js).
# Needs root, runc, buildah, hyperfine, busybox-static. Prints hyperfine tables and writes
# JSON results to $OUT (default bench/build/out/).
#
#   bench/build/run.sh [RUNS]        # RUNS per scenario, default 10 (cold: RUNS/2)
#   bench/build/run.sh contexts [RUNS] [SIZES]   # big build contexts vs BuildKit (see below)
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
runs=${1:-10}
[ "$runs" = contexts ] && runs=0 # the contexts benchmark takes its own arguments
cold_runs=$(( runs / 2 > 3 ? runs / 2 : 3 ))
out=${OUT:-$repo/bench/build/out}
mkdir -p "$out"

target=${CARGO_TARGET_DIR:-$repo/target}
strata=${STRATA:-$target/release/strata}
if [ ! -x "$strata" ]; then
    cargo build --release -q -p strata
fi

# --- Build contexts of 1k / 10k / 50k files: strata vs BuildKit ---------------------------------
# `bench/build/run.sh contexts [RUNS] [SIZES]`: a context of N files (100 per directory, 1–8 KiB
# each, text-like) built by `FROM scratch` + `COPY . /app/`, by strata and by BuildKit
# (DOCKER_BUILDKIT=1, the docker.io client /usr/bin/docker, a private dockerd). Interleaved runs,
# medians and per-pair ratios, the load before each size. Scenarios: no-op rebuild, one file
# changed (a line appended), and a `find -printf` stat of the tree as the floor.
# Needs root, dockerd, /usr/bin/docker, python3. Default: 7 runs, sizes 1000 10000 50000.
contexts_bench() {
    local runs=${1:-7} sizes=${2:-"1000 10000 50000"}
    local docker=${DOCKER_CLIENT:-/usr/bin/docker}
    for t in dockerd "$docker" python3; do
        command -v "$t" >/dev/null || { echo "needs $t" >&2; exit 1; }
    done
    local work
    work=/tmp/strata-bench-ctx-$$
    mkdir -m 700 "$work"
    mkdir -p "$work/docker-data" "$work/docker-exec"
    dockerd --iptables=false --bridge=none --host "unix://$work/docker.sock" \
        --data-root "$work/docker-data" --exec-root "$work/docker-exec" \
        --pidfile "$work/docker.pid" >"$work/dockerd.log" 2>&1 &
    # shellcheck disable=SC2064
    trap "kill \$(cat $work/docker.pid 2>/dev/null) 2>/dev/null || true; sleep 2; \
        grep -o ' $work[^ ]*' /proc/mounts | sort -r | xargs -r -n1 umount 2>/dev/null || true; \
        rm -rf $work || true" EXIT
    local D="$docker -H unix://$work/docker.sock"
    for _ in $(seq 300); do $D info >/dev/null 2>&1 && break; sleep 0.2; done
    local S="$strata --store $work/store"
    ms() { local a b; a=$(date +%s%N); "$@" >/dev/null 2>&1 || { echo "failed: $*" >&2; exit 1; }; b=$(date +%s%N); echo $(( (b - a) / 1000000 )); }
    : >"$work/times.tsv"
    for n in $sizes; do
        local ctx=$work/ctx-$n
        python3 - "$ctx" "$n" <<'PY'
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
rnd = random.Random(n)
words = [("%x" % rnd.getrandbits(32)) for _ in range(4096)]
for i in range(n):
    d = os.path.join(root, "d%03d" % (i // 100 // 100), "d%03d" % (i // 100 % 100))
    os.makedirs(d, exist_ok=True)
    size = rnd.randint(1024, 8192)
    text, length = [], 0
    while length < size:
        w = rnd.choice(words); text.append(w); length += len(w) + 1
    open(os.path.join(d, "f%05d.txt" % i), "w").write(" ".join(text)[:size] + "\n")
open(os.path.join(root, "Dockerfile"), "w").write("FROM scratch\nCOPY . /app/\n")
PY
        local victim
        victim=$(find "$ctx" -name '*.txt' | sort | sed -n "$(( n / 2 ))p")
        local sb="$S build -t ctx$n $ctx --progress plain"
        local db="env DOCKER_BUILDKIT=1 $D build -q -t ctx$n $ctx"
        echo "==> $n files ($(du -sh "$ctx" | cut -f1)); load: $(cut -d' ' -f1-3 /proc/loadavg)"
        echo "    strata:   $sb"
        echo "    buildkit: $db"
        echo "    stat:     find $ctx -printf '%s %T@ %C@ %i %m %p\\n'"
        echo "cold $n strata $(ms $sb)" >>"$work/times.tsv"
        echo "cold $n buildkit $(ms $db)" >>"$work/times.tsv"
        sleep 2 # the files' times must be older than the stat cache's trust margin
        $sb >/dev/null 2>&1; $db >/dev/null 2>&1
        # No-ops first, on a tree nothing has changed in for a while (an edit less than 2 s
        # before a build is read again: see docs/ARCHITECTURE.md, the stat cache).
        for i in $(seq "$runs"); do
            # Interleaved, the first tool alternating.
            local order="strata buildkit"; [ $(( i % 2 )) = 0 ] && order="buildkit strata"
            for tool in $order; do
                if [ "$tool" = strata ]; then cmd=$sb; else cmd=$db; fi
                echo "noop $n $tool $(ms $cmd)" >>"$work/times.tsv"
            done
            echo "noop $n find $(ms find "$ctx" -printf '%s %T@ %C@ %i %m %p\n')" >>"$work/times.tsv"
        done
        for i in $(seq "$runs"); do
            local order="strata buildkit"; [ $(( i % 2 )) = 0 ] && order="buildkit strata"
            for tool in $order; do
                if [ "$tool" = strata ]; then cmd=$sb; else cmd=$db; fi
                echo "// $tool $i $RANDOM" >>"$victim"
                echo "onefile $n $tool $(ms $cmd)" >>"$work/times.tsv"
                # Then a no-op right after the edit: the edited file is too recent for the
                # stat cache to trust.
                echo "noop-after-edit $n $tool $(ms $cmd)" >>"$work/times.tsv"
            done
        done
        $D rmi -f "ctx$n" >/dev/null 2>&1 || true
        $D builder prune -af >/dev/null 2>&1 || true
    done
    python3 - "$work/times.tsv" <<'PY'
import statistics, sys, collections
rows = [l.split() for l in open(sys.argv[1])]
t = collections.defaultdict(list)
for scen, n, tool, ms in rows:
    t[(scen, int(n), tool)].append(int(ms))
print("\n| scenario | files | strata median | BuildKit median | strata / BuildKit (median of per-pair ratios) | find -printf median | strata / find |")
print("|---|---|---|---|---|---|---|")
for scen in ["cold", "noop", "noop-after-edit", "onefile"]:
    for n in sorted({k[1] for k in t}):
        s, b = t.get((scen, n, "strata")), t.get((scen, n, "buildkit"))
        if not s or not b:
            continue
        ratio = statistics.median(x / y for x, y in zip(s, b))
        f = t.get((scen, n, "find"))
        fm = f"{statistics.median(f)} ms" if f else "-"
        fr = f"{statistics.median(s) / statistics.median(f):.1f}x" if f else "-"
        print(f"| {scen} | {n} | {statistics.median(s)} ms | {statistics.median(b)} ms | {ratio:.3f} | {fm} | {fr} |")
PY
}

if [ "${1:-}" = contexts ]; then
    contexts_bench "${2:-}" "${3:-}"
    exit 0
fi

for t in buildah hyperfine runc; do
    command -v "$t" >/dev/null || { echo "needs $t (apt-get install $t)" >&2; exit 1; }
done

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
