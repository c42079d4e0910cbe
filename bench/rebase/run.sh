#!/usr/bin/env bash
# Rebase benchmark: a strata.toml project of one base and N copy-only apps FROM it (default
# 200). Each round changes the base (a new /etc/version), then times `strata build` of the
# whole project twice, interleaved, in two stores that start alike:
#   auto:  the apps follow the moved base (automatic rebase, docs/rebase.md);
#   full:  the same project with `rebase = false` on every app, so each app's steps run;
#   all:   only the base is built (`strata build --project P base`), then
#          `strata rebase --all --onto base` moves every app in one pass.
# Both also rebuild the base itself (one COPY); a third row times a no-op build of the same
# project (nothing changed), the floor. Prints per-round times, the medians, and the
# layer bytes the app builds wrote (from `--progress json`'s image_done events).
# Needs hyperfine, busybox-static; no root (no RUN step).
#
#   bench/rebase/run.sh [APPS] [ROUNDS]     # defaults 200 and 5
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
apps=${1:-200}
rounds=${2:-5}
for t in hyperfine python3; do
    command -v "$t" >/dev/null || { echo "needs $t" >&2; exit 1; }
done
target=${CARGO_TARGET_DIR:-$repo/target}
strata=${STRATA:-$target/release/strata}
if [ ! -x "$strata" ]; then
    cargo build --release -q -p strata
fi
work=$(mktemp -d /tmp/strata-bench-rebase-XXXXXX)
trap 'rm -rf "$work"' EXIT

# A busybox root filesystem, as scripts/main-job makes it.
mkdir -p "$work/rootfs/bin" "$work/rootfs/etc" "$work/rootfs/tmp"
cp /bin/busybox "$work/rootfs/bin/"
for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$work/rootfs/bin/$applet"
done
echo 'root:x:0:0:root:/root:/bin/sh' >"$work/rootfs/etc/passwd"
tar -C "$work/rootfs" -cf "$work/rootfs.tar" .

# The project: base/ and apps/NNN/ (a script and 64 KiB of its own data each).
proj=$work/proj
mkdir -p "$proj/base"
printf 'FROM busybox\nCOPY version /etc/version\nENV PATH=/opt/base/bin:/bin\n' >"$proj/base/Dockerfile"
echo 0 >"$proj/base/version"
printf '[[image]]\nname = "base"\ncontext = "base"\n' >"$proj/strata.toml"
for i in $(seq -w 1 "$apps"); do
    d=$proj/apps/$i
    mkdir -p "$d"
    printf '#!/bin/sh\necho app %s\n' "$i" >"$d/run.sh"
    chmod 755 "$d/run.sh"
    head -c 65536 /dev/urandom >"$d/data.bin"
    printf 'FROM base\nCOPY . /app/\nENV APP=%s\nWORKDIR /app\nCMD ["/app/run.sh"]\n' "$i" >"$d/Dockerfile"
    printf '\n[[image]]\nname = "app-%s"\ncontext = "apps/%s"\n' "$i" "$i" >>"$proj/strata.toml"
done
# The `rebase --all` copy (its own strata.lock: each store imports busybox anew).
cp -a "$proj" "$work/proj-all"
# The full-rebuild copy: the same files, every app with `rebase = false`.
cp -a "$proj" "$work/proj-full"
sed -i 's/^context = "apps\/\(.*\)"$/context = "apps\/\1"\nrebase = false/' "$work/proj-full/strata.toml"

for mode in auto full all; do
    p=$proj
    [ "$mode" = full ] && p=$work/proj-full
    [ "$mode" = all ] && p=$work/proj-all
    "$strata" --store "$work/store-$mode" import "$work/rootfs.tar" busybox >/dev/null 2>&1
    "$strata" --store "$work/store-$mode" build --project "$p" --progress plain >/dev/null 2>&1
done

cat >"$work/build.sh" <<EOF
#!/bin/sh
# \$1: auto|full. The base moves first (outside the timing: hyperfine's --prepare).
p=$proj
[ "\$1" = full ] && p=$work/proj-full
[ "\$1" = all ] && p=$work/proj-all
if [ "\$1" = all ]; then
    "$strata" --store "$work/store-all" build --project "\$p" base --progress json >/dev/null 2>"$work/last-all.json"
    exec "$strata" --store "$work/store-all" rebase --all --onto base >/dev/null 2>>"$work/last-all.json"
fi
exec "$strata" --store "$work/store-\$1" build --project "\$p" --progress json >/dev/null 2>"$work/last-\$1.json"
EOF
chmod +x "$work/build.sh"

bytes() { # layer bytes the app builds wrote, and how many apps said `rebased`
    python3 - "$1" <<'EOF'
import json, sys
written = rebased = apps = 0
for line in open(sys.argv[1]):
    if line.startswith("Rebased "):  # `rebase --all`'s summary
        rebased += int(line.split()[1])
        continue
    try:
        e = json.loads(line)
    except ValueError:
        continue
    if e.get("event") == "image_done" and e["image"].startswith("app-"):
        apps += 1
        written += e["layer_bytes_written"]
    if e.get("event") == "rebased":
        rebased += 1
print(f"{apps} apps, {rebased} rebased, {written} layer bytes written")
EOF
}

: >"$work/times"
for r in $(seq 1 "$rounds"); do
    for mode in auto full all; do
        p=$proj
        [ "$mode" = full ] && p=$work/proj-full
        [ "$mode" = all ] && p=$work/proj-all
        hyperfine --runs 1 --style none \
            --prepare "echo $r >$p/base/version" \
            --export-json "$work/h.json" "$work/build.sh $mode" >/dev/null
        t=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["results"][0]["mean"])' "$work/h.json")
        echo "$mode $t" >>"$work/times"
        echo "round $r $mode: ${t}s; $(bytes "$work/last-$mode.json")"
    done
    # The floor: the same build again with nothing changed (every image a cache hit).
    hyperfine --runs 1 --style none --export-json "$work/h.json" "$work/build.sh auto" >/dev/null
    t=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["results"][0]["mean"])' "$work/h.json")
    echo "noop $t" >>"$work/times"
    echo "round $r noop: ${t}s"
done
python3 - "$work/times" "$apps" <<'EOF'
import statistics, sys
times = {}
for line in open(sys.argv[1]):
    mode, t = line.split()
    times.setdefault(mode, []).append(float(t))
auto = statistics.median(times["auto"])
for mode, ts in times.items():
    m = statistics.median(ts)
    print(f"{mode}: median {m:.3f}s over {len(ts)} rounds (min {min(ts):.3f}, max {max(ts):.3f}), "
          f"{m / auto:.2f}x auto, {sys.argv[2]} apps")
EOF
command -v crane >/dev/null || echo "crane: not installed here, no crane row"
