#!/usr/bin/env bash
# Registry throughput: strata's registry vs Debian's docker-registry (distribution 2.8), and
# `strata push` vs `skopeo copy`, all over loopback HTTP.
#
# 1. Blob upload (monolithic POST + PUT with curl) and download (curl GET) of one random blob.
# 2. Push of an image whose single layer is that blob stored uncompressed (`strata import
#    --compression none`), by `strata push` and by `skopeo copy`, to both registries.
#
# Every upload/push goes to a fresh repository, so no HEAD finds the blob and nothing is
# skipped; both push clients' "where was this blob seen" caches are emptied before each run
# (strata: the store's SQLite metadata; skopeo: its blob-info cache, hidden under a private
# tmpfs in a mount namespace) so neither mounts the blob from an earlier run's repository.
#
# Usage: bench/registry/run.sh            Env: MIB (blob size, default 512), RUNS (default 5),
#        BENCH_DIR (default /tmp/strata-registry-bench), CARGO_TARGET_DIR, STRATA (a built
#        binary to use instead of building one).
set -euo pipefail
cd "$(dirname "$0")/../.."
MIB=${MIB:-512}
RUNS=${RUNS:-5}
B=${BENCH_DIR:-/tmp/strata-registry-bench}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target-regbench}
if [ -z "${STRATA:-}" ]; then
  cargo build -q --release -p strata
  STRATA=$CARGO_TARGET_DIR/release/strata
fi
for t in /usr/bin/docker-registry /usr/bin/skopeo hyperfine curl; do
  command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 1; }
done

rm -rf "$B"; mkdir -p "$B"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$B"/strata-reg "$B"/docker-reg "$B"/store
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 200); do curl -fs -o /dev/null "http://127.0.0.1:$1/v2/" && return 0; sleep 0.05; done
  echo "nothing answers on port $1" >&2; exit 1
}

# The two registries.
SP=$(free_port)
STRATA_STORE=$B/store "$STRATA" registry serve --addr "127.0.0.1:$SP" --root "$B/strata-reg" \
  >"$B/strata-reg.log" 2>&1 &
PIDS+=($!)
DP=$(free_port)
mkdir -p "$B/docker-reg"
cat >"$B/docker-reg.yml" <<EOF
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $B/docker-reg
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$DP
  secret: strata-bench-secret
EOF
/usr/bin/docker-registry serve "$B/docker-reg.yml" >"$B/docker-reg.log" 2>&1 &
PIDS+=($!)
wait_port "$SP"; wait_port "$DP"

# The blob, and the image whose one uncompressed layer is a tar of it.
head -c "${MIB}M" /dev/urandom >"$B/blob"
DIGEST=sha256:$(sha256sum "$B/blob" | cut -d' ' -f1)
mkdir -p "$B/rootfs"; mv "$B/blob" "$B/rootfs/blob"; BLOB=$B/rootfs/blob
tar -C "$B/rootfs" -cf "$B/rootfs.tar" blob
export STRATA_STORE=$B/store
"$STRATA" import "$B/rootfs.tar" img:1 --compression none >/dev/null
rm "$B/rootfs.tar"
LAYER_BYTES=$(python3 -c "import json,sys; i=json.load(open('$B/store/index.json'))
m=[d for d in i['manifests'] if d.get('annotations',{}).get('org.opencontainers.image.ref.name')=='img:1'][0]
mf=json.load(open('$B/store/blobs/sha256/'+m['digest'].split(':')[1]))
print(sum(l['size'] for l in mf['layers']))")
echo "blob: $MIB MiB $DIGEST; image layer: $LAYER_BYTES bytes (uncompressed tar)" >&2

# upload.sh HOSTPORT: POST then monolithic PUT of the blob to a repository never used before.
cat >"$B/upload.sh" <<EOF
#!/usr/bin/env bash
set -euo pipefail
h=http://\$1; repo=up\$(date +%s%N)
loc=\$(curl -fsS -D - -o /dev/null -X POST "\$h/v2/\$repo/blobs/uploads/" \\
  | tr -d '\r' | awk 'tolower(\$1)=="location:" {print \$2}')
case "\$loc" in /*) loc=\$h\$loc ;; esac
case "\$loc" in *\?*) sep='&' ;; *) sep='?' ;; esac
curl -fsS -o /dev/null -T "$BLOB" -X PUT -H 'Content-Type: application/octet-stream' \\
  "\$loc\${sep}digest=$DIGEST"
EOF
chmod +x "$B/upload.sh"
# One copy in a fixed repository of each registry, for the downloads.
for p in "$SP" "$DP"; do
  loc=$(curl -fsS -D - -o /dev/null -X POST "http://127.0.0.1:$p/v2/dl/blobs/uploads/" \
    | tr -d '\r' | awk 'tolower($1)=="location:" {print $2}')
  case "$loc" in /*) loc=http://127.0.0.1:$p$loc ;; esac
  case "$loc" in *\?*) sep='&' ;; *) sep='?' ;; esac
  curl -fsS -o /dev/null -T "$BLOB" -X PUT -H 'Content-Type: application/octet-stream' \
    "$loc${sep}digest=$DIGEST"
  got=$(curl -fsS "http://127.0.0.1:$p/v2/dl/blobs/$DIGEST" | sha256sum | cut -d' ' -f1)
  [ "sha256:$got" = "$DIGEST" ] || { echo "port $p served the wrong bytes" >&2; exit 1; }
done

H="hyperfine --runs $RUNS --warmup 1 --style basic"
$H --export-json "$B/blob.json" \
  -n "upload strata-registry" "$B/upload.sh 127.0.0.1:$SP" \
  -n "upload docker-registry" "$B/upload.sh 127.0.0.1:$DP" \
  -n "download strata-registry" "curl -fsS -o /dev/null http://127.0.0.1:$SP/v2/dl/blobs/$DIGEST" \
  -n "download docker-registry" "curl -fsS -o /dev/null http://127.0.0.1:$DP/v2/dl/blobs/$DIGEST"

# Server CPU per download (user + system, from /proc/PID/stat), 3 downloads each: where the
# time goes besides the client.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
for i in 0 1; do
  pid=${PIDS[$i]}; port=$([ "$i" = 0 ] && echo "$SP" || echo "$DP")
  a=$(cpu_ticks "$pid")
  for _ in 1 2 3; do curl -fsS -o /dev/null "http://127.0.0.1:$port/v2/dl/blobs/$DIGEST"; done
  b=$(cpu_ticks "$pid")
  name=$([ "$i" = 0 ] && echo strata-registry || echo docker-registry)
  echo "server CPU per download, $name: $(( (b - a) * 1000 / $(getconf CLK_TCK) / 3 )) ms" \
    | tee -a "$B/server-cpu.txt" >&2
done

# Push commands; each picks a fresh repository name at run time.
SPUSH="$STRATA push img:1 127.0.0.1:PORT/p\$(date +%s%N)/img:1"
SKOPEO="unshare -m sh -c 'mount -t tmpfs bic /var/lib/containers/cache && exec skopeo copy -q --dest-tls-verify=false oci:$B/store:img:1 docker://127.0.0.1:PORT/s\$(date +%s%N)/img:1'"
SKOPEO_PD="unshare -m sh -c 'mount -t tmpfs bic /var/lib/containers/cache && exec skopeo copy -q --preserve-digests --dest-tls-verify=false oci:$B/store:img:1 docker://127.0.0.1:PORT/s\$(date +%s%N)/img:1'"
FORGET="rm -f $B/store/strata/meta-v1.db $B/store/strata/meta-v1.db-wal $B/store/strata/meta-v1.db-shm"
# Check that a push after an earlier one (as in the benchmark) still uploads every blob.
for p in "$SP" "$DP"; do
  for _ in 1 2; do
    $FORGET
    out=$(sh -c "${SPUSH//PORT/$p}" 2>&1 >/dev/null)
    echo "check: $(echo "$out" | grep Pushed)" >&2
    case "$out" in *" 2 uploaded "*" 0 mounted, 0 already there"*) ;; *) echo "strata push skipped blobs" >&2; exit 1 ;; esac
    cmd=${SKOPEO//PORT/$p}
    out=$(sh -c "${cmd//-q /}" 2>&1)
    echo "check: $(echo "$out" | grep -i blob | tr '\n' ' ')" >&2
    if echo "$out" | grep -qi "skipped\|already exists"; then echo "skopeo skipped blobs" >&2; exit 1; fi
  done
done
$H --export-json "$B/push.json" --prepare "$FORGET" \
  -n "strata push -> strata-registry" "${SPUSH//PORT/$SP}" \
  -n "skopeo copy -> strata-registry" "${SKOPEO//PORT/$SP}" \
  -n "skopeo copy --preserve-digests -> strata-registry" "${SKOPEO_PD//PORT/$SP}" \
  -n "strata push -> docker-registry" "${SPUSH//PORT/$DP}" \
  -n "skopeo copy -> docker-registry" "${SKOPEO//PORT/$DP}" \
  -n "skopeo copy --preserve-digests -> docker-registry" "${SKOPEO_PD//PORT/$DP}"

echo "SKOPEO_CMD: ${SKOPEO//PORT/$SP}" >"$B/commands.txt"
python3 - "$B" "$MIB" "$LAYER_BYTES" <<'PY'
import json, statistics, sys
b, mib, layer = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def rows(f):
    return {r["command"]: statistics.median(r["times"]) for r in json.load(open(f"{b}/{f}"))["results"]}
blob, push = rows("blob.json"), rows("push.json")
print(f"\n### blob transfer ({mib} MiB, curl, loopback)\n")
print("| | median s | MiB/s |\n|---|---:|---:|")
for k, t in blob.items():
    print(f"| {k} | {t:.3f} | {mib / t:.0f} |")
u = blob["upload docker-registry"] / blob["upload strata-registry"]
d = blob["download docker-registry"] / blob["download strata-registry"]
print(f"\nupload: strata-registry is {u:.2f}x docker-registry's speed; download: {d:.2f}x")
lm = layer / 2**20
print(f"\n### push of one image, one {lm:.0f} MiB uncompressed layer, fresh repository each run\n")
print("| | median s | MiB/s (layer) |\n|---|---:|---:|")
for k, t in push.items():
    print(f"| {k} | {t:.3f} | {lm / t:.0f} |")
for reg in ("strata-registry", "docker-registry"):
    s = push[f"strata push -> {reg}"]
    print(f"\n{reg}: strata push is {push[f'skopeo copy -> {reg}'] / s:.2f}x skopeo copy's speed, "
          f"{push[f'skopeo copy --preserve-digests -> {reg}'] / s:.2f}x skopeo copy --preserve-digests'")
PY
cat "$B/server-cpu.txt"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
