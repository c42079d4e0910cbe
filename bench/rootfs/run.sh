#!/usr/bin/env bash
# Layer write and unpack throughput: strata-rootfs vs tar|gzip, tar|pigz, tar|zstd, tar -x.
# Usage: bench/rootfs/run.sh [FILES]   (default 50000 files, ~300 MB)
# Env: BENCH_DIR (default /tmp/strata-rootfs-bench), RUNS (default 3), TREE (use an existing
# tree, e.g. a debootstrap, instead of generating one), ONLY=write|apply (one half),
# APPLY_DIR (where unpacks go; default tmpfs /dev/shm so disk writeback of the previous run
# does not dominate: on disk every tool is I/O bound and the numbers are noise).
set -euo pipefail
cd "$(dirname "$0")/../.."
FILES=${1:-50000}
RUNS=${RUNS:-3}
B=${BENCH_DIR:-/tmp/strata-rootfs-bench}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target-rootfs}
cargo build -q --release -p strata-rootfs --example layerbench
LB=$CARGO_TARGET_DIR/release/examples/layerbench
mkdir -p "$B"
if [ -z "${TREE:-}" ]; then
  TREE=$B/tree
  [ -d "$TREE" ] || "$LB" gen "$TREE" "$FILES"
fi
MB=$(du -sm --apparent-size "$TREE" | cut -f1)
echo "tree: $TREE, $(find "$TREE" | wc -l) paths, ${MB} MB apparent" >&2
O=$B/out; mkdir -p "$O"
H="hyperfine --runs $RUNS --warmup 1 --style basic"

if [ "${ONLY:-write}" = write ]; then
$H --export-json "$B/write.json" \
  -n "strata gzip-6"   "$LB write $TREE gzip $O/s.tgz" \
  -n "strata gzip-1"   "$LB write $TREE gzip $O/s1.tgz 1" \
  -n "strata zstd-3"   "$LB write $TREE zstd $O/s.tzst" \
  -n "strata none"     "$LB write $TREE none $O/s.tar" \
  -n "tar | gzip -6"   "tar -C $TREE -cf - . | gzip -6 > $O/t.tgz" \
  -n "tar | pigz -6"   "tar -C $TREE -cf - . | pigz -6 > $O/p.tgz" \
  -n "tar | zstd -3"   "tar -C $TREE -cf - . | zstd -3 -q > $O/t.tzst" \
  -n "tar"             "tar -C $TREE -cf $O/t.tar ."
fi

X=${APPLY_DIR:-/dev/shm/strata-rootfs-bench-x}
if [ "${ONLY:-apply}" = apply ]; then
$H --export-json "$B/apply.json" --prepare "rm -rf $X && mkdir -p $X" \
  -n "strata apply gzip" "$LB apply $O/s.tgz gzip $X" \
  -n "strata apply zstd" "$LB apply $O/s.tzst zstd $X" \
  -n "strata apply none" "$LB apply $O/s.tar none $X" \
  -n "tar -xzf (gzip)"   "tar -C $X -xzf $O/s.tgz" \
  -n "tar -x (zstd)"     "tar -C $X --zstd -xf $O/s.tzst" \
  -n "tar -xf (none)"    "tar -C $X -xf $O/s.tar"
rm -rf "$X"
fi

python3 - "$B" "$MB" "$O" <<'PY'
import json, os, statistics, sys
b, mb, o = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sizes = {"strata gzip-6": "s.tgz", "strata gzip-1": "s1.tgz", "strata zstd-3": "s.tzst", "strata none": "s.tar",
         "tar | gzip -6": "t.tgz", "tar | pigz -6": "p.tgz", "tar | zstd -3": "t.tzst", "tar": "t.tar"}
for kind in ("write", "apply"):
    if not os.path.exists(f"{b}/{kind}.json"):
        continue
    rs = json.load(open(f"{b}/{kind}.json"))["results"]
    base = statistics.median(rs[0]["times"])
    print(f"\n### {kind} ({mb} MB of file data)\n")
    print("| command | median s | MB/s | vs first row |" + (" blob MB |" if kind == "write" else ""))
    print("|---|---|---|---|" + ("---|" if kind == "write" else ""))
    for r in rs:
        med = statistics.median(r["times"])
        name = r['command'].replace('|', '\\|')
        row = f"| {name} | {med:.2f} | {mb/med:.0f} | {med/base:.2f}x |"
        if kind == "write":
            row += f" {os.path.getsize(os.path.join(o, sizes[r['command']]))/1e6:.1f} |"
        print(row)
PY
