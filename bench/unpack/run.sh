#!/usr/bin/env bash
# Image unpack throughput: `strata unpack` vs `umoci unpack` on the same image in the same
# store (strata's store is an OCI layout, so umoci reads it directly), plus `tar -x` of the
# same layer as the floor. (Debian's umoci 0.4 cannot unpack zstd layers, so it has no zstd row.)
# Usage: bench/unpack/run.sh [FILES]   (default 20000 generated files)
# Env: BENCH_DIR (default /tmp/strata-unpack-bench), RUNS (default 3), TREE (an existing tree,
# e.g. a debootstrap, instead of a generated one), X (unpack target dir, default on tmpfs).
set -euo pipefail
cd "$(dirname "$0")/../.."
FILES=${1:-20000}
RUNS=${RUNS:-3}
B=${BENCH_DIR:-/tmp/strata-unpack-bench}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build -q --release -p strata
cargo build -q --release -p strata-rootfs --example layerbench
S=$CARGO_TARGET_DIR/release/strata
LB=$CARGO_TARGET_DIR/release/examples/layerbench
mkdir -p "$B"
if [ -z "${TREE:-}" ]; then
  TREE=$B/tree
  [ -d "$TREE" ] || "$LB" gen "$TREE" "$FILES"
fi
MB=$(du -sm --apparent-size "$TREE" | cut -f1)
echo "tree: $TREE, $(find "$TREE" | wc -l) paths, ${MB} MB apparent" >&2
export STRATA_STORE=$B/store
rm -rf "$STRATA_STORE"
tar -C "$TREE" --numeric-owner -cf "$B/tree.tar" .
"$S" import "$B/tree.tar" bench:gzip --compression gzip >/dev/null
"$S" import "$B/tree.tar" bench:zstd --compression zstd >/dev/null
layer=$("$S" inspect bench:gzip --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["manifest"]["layers"][0]["digest"].split(":")[1])')
X=${X:-/dev/shm/strata-unpack-bench-x}
hyperfine --runs "$RUNS" --warmup 1 --style basic --export-json "$B/unpack.json" \
  --prepare "rm -rf $X" \
  -n "strata unpack (gzip)" "$S unpack bench:gzip $X/rootfs" \
  -n "umoci unpack (gzip)"  "umoci unpack --image $STRATA_STORE:bench:gzip $X" \
  -n "strata unpack (zstd)" "$S unpack bench:zstd $X/rootfs" \
  -n "tar -xzf (same layer)" "mkdir -p $X && tar -C $X -xzf $STRATA_STORE/blobs/sha256/$layer"
rm -rf "$X"
python3 - "$B/unpack.json" "$MB" <<'PY'
import json, statistics, sys
rs = json.load(open(sys.argv[1]))["results"]
mb = int(sys.argv[2])
base = statistics.median(rs[0]["times"])
print(f"\n| command | median s | MB/s | vs strata unpack (gzip) |\n|---|---|---|---|")
for r in rs:
    m = statistics.median(r["times"])
    print(f"| {r['command']} | {m:.2f} | {mb/m:.0f} | {m/base:.2f}x |")
PY
