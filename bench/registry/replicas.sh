#!/usr/bin/env bash
# strata's registry with S3 + PostgreSQL (the replica setup) next to docker-registry on the same
# S3 server, strata with S3 + SQLite for the blob baseline, and both registries on the
# filesystem, all on loopback HTTP:
#
# 1. Manifest GET and HEAD requests per second: curl in parallel mode (`-Z`, 32 at a time,
#    connections reused) fetching one tag N times.
# 2. One random blob: upload (monolithic POST + PUT with curl) and download (curl GET).
#
# S3 is moto_server (pip install 'moto[server]'); PostgreSQL is a private cluster (initdb in a
# temp dir; as root it runs as the `postgres` user). docker-registry serves blobs itself
# (`redirect: disable`) so both registries move the bytes.
#
# Usage: bench/registry/replicas.sh     Env: MIB (blob size, default 512), RUNS (default 3),
#        REQS (manifest requests per run, default 5000), BENCH_DIR, STRATA (a built binary).
set -euo pipefail
cd "$(dirname "$0")/../.."
MIB=${MIB:-512}
RUNS=${RUNS:-3}
REQS=${REQS:-5000}
B=${BENCH_DIR:-/tmp/strata-replicas-bench}
if [ -z "${STRATA:-}" ]; then
  cargo build -q --release -p strata
  STRATA=${CARGO_TARGET_DIR:-target}/release/strata
fi
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
for t in /usr/bin/docker-registry moto_server curl "$PGBIN/initdb"; do
  command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 1; }
done

rm -rf "$B"; mkdir -p "$B"
PIDS=()
PG_PID=
cleanup() {
  # Newest first: the registries hold connections to PostgreSQL, which SIGINT stops at once.
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    local sig=TERM
    [ "${PIDS[i]}" = "$PG_PID" ] && sig=INT
    kill -"$sig" "${PIDS[i]}" 2>/dev/null || true; wait "${PIDS[i]}" 2>/dev/null || true
  done
  [ -n "${KEEP:-}" ] || rm -rf "$B"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 300); do curl -fs -o /dev/null "http://127.0.0.1:$1/$2" && return 0; sleep 0.05; done
  echo "nothing answers on port $1" >&2; exit 1
}

# S3.
MP=$(free_port)
moto_server -H 127.0.0.1 -p "$MP" >"$B/moto.log" 2>&1 &
PIDS+=($!)
wait_port "$MP" ""
for b in strata-pg strata-sqlite docker; do curl -fs -X PUT "http://127.0.0.1:$MP/$b" >/dev/null; done

# PostgreSQL.
PP=$(free_port)
mkdir -p "$B/pg"
AS=()
if [ "$(id -u)" = 0 ]; then
  chown postgres: "$B" "$B/pg"
  AS=(setpriv --reuid="$(id -u postgres)" --regid="$(id -g postgres)" --clear-groups --)
fi
"${AS[@]}" "$PGBIN/initdb" -D "$B/pg" -U postgres -A trust --no-sync >/dev/null
"${AS[@]}" "$PGBIN/postgres" -D "$B/pg" -k "$B" -h 127.0.0.1 -p "$PP" >"$B/pg.log" 2>&1 &
PG_PID=$!
PIDS+=($!)
for _ in $(seq 200); do "$PGBIN/pg_isready" -q -U postgres -h 127.0.0.1 -p "$PP" && break; sleep 0.05; done

# The registries.
s3() {
  printf '[s3]\nbucket = "%s"\nendpoint = "http://127.0.0.1:%s"\naccess_key = "test"\nsecret_key = "test"\nallow_http = true\n' "$1" "$MP"
}
SPG=$(free_port); SSQ=$(free_port); DP=$(free_port)
{ echo "root = \"$B/strata-pg\""; s3 strata-pg; printf '[postgres]\nurl = "postgres://postgres@127.0.0.1:%s/postgres"\n' "$PP"; } >"$B/strata-pg.toml"
{ echo "root = \"$B/strata-sqlite\""; s3 strata-sqlite; } >"$B/strata-sqlite.toml"
STRATA_STORE=$B/store "$STRATA" registry serve --addr "127.0.0.1:$SPG" --config "$B/strata-pg.toml" >"$B/spg.log" 2>&1 &
PIDS+=($!)
STRATA_STORE=$B/store "$STRATA" registry serve --addr "127.0.0.1:$SSQ" --config "$B/strata-sqlite.toml" >"$B/ssq.log" 2>&1 &
PIDS+=($!)
cat >"$B/docker.yml" <<YML
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage:
  s3: {region: us-east-1, regionendpoint: "http://127.0.0.1:$MP", bucket: docker, accesskey: test, secretkey: test, secure: false, v4auth: true}
  delete: {enabled: true}
  redirect: {disable: true}
  cache: {blobdescriptor: inmemory}
http: {addr: "127.0.0.1:$DP"}
YML
# Its AWS SDK refuses a custom CA bundle over plain HTTP: none is needed here.
env -u AWS_CA_BUNDLE docker-registry serve "$B/docker.yml" >"$B/docker.log" 2>&1 &
PIDS+=($!)
# And both on the filesystem: strata's own storage and SQLite, docker-registry's filesystem
# driver.
SFS=$(free_port); DFS=$(free_port)
STRATA_STORE=$B/store "$STRATA" registry serve --addr "127.0.0.1:$SFS" --root "$B/strata-fs" >"$B/sfs.log" 2>&1 &
PIDS+=($!)
cat >"$B/docker-fs.yml" <<YML
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage:
  filesystem: {rootdirectory: "$B/docker-fs"}
  delete: {enabled: true}
  cache: {blobdescriptor: inmemory}
http: {addr: "127.0.0.1:$DFS"}
YML
docker-registry serve "$B/docker-fs.yml" >"$B/docker-fs.log" 2>&1 &
PIDS+=($!)
for p in "$SPG" "$SSQ" "$DP" "$SFS" "$DFS"; do wait_port "$p" v2/; done

now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# A small image to fetch.
CONFIG='{"architecture":"amd64","os":"linux"}'
LAYER="$B/layer"; head -c 1024 /dev/urandom >"$LAYER"
push_blob() { # port repo file -> digest
  local d loc
  d=sha256:$(sha256sum "$3" | cut -d' ' -f1)
  loc=$(curl -fsS -D - -o /dev/null -X POST "http://127.0.0.1:$1/v2/$2/blobs/uploads/" | tr -d '\r' | awk 'tolower($1)=="location:"{print $2}')
  case "$loc" in http*) ;; *) loc="http://127.0.0.1:$1$loc";; esac
  case "$loc" in *\?*) loc="$loc&digest=$d";; *) loc="$loc?digest=$d";; esac
  curl -fsS -o /dev/null -X PUT -H 'Content-Type: application/octet-stream' -T "$3" "$loc"
  echo "$d"
}
printf '%s' "$CONFIG" >"$B/config"
MANIFEST_TYPE=application/vnd.oci.image.manifest.v1+json
for p in "$SPG" "$SSQ" "$DP" "$SFS" "$DFS"; do
  cd_=$(push_blob "$p" bench/app "$B/config"); ld=$(push_blob "$p" bench/app "$LAYER")
  printf '{"schemaVersion":2,"mediaType":"%s","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"%s","size":1024}]}' \
    "$MANIFEST_TYPE" "$cd_" "${#CONFIG}" "$ld" >"$B/manifest"
  curl -fsS -o /dev/null -X PUT -H "Content-Type: $MANIFEST_TYPE" --data-binary @"$B/manifest" "http://127.0.0.1:$p/v2/bench/app/manifests/v1"
done

manifest_rps() { # port GET|HEAD -> req/s
  local cfg=$B/curl-$1-$2 t0 t1 flag=""
  [ "$2" = HEAD ] && flag="-I"
  for _ in $(seq "$REQS"); do echo "url = \"http://127.0.0.1:$1/v2/bench/app/manifests/v1\""; echo "output = /dev/null"; done >"$cfg"
  t0=$(now)
  curl -sfZ --no-progress-meter --parallel-max 32 $flag -H "Accept: $MANIFEST_TYPE" -K "$cfg"
  t1=$(now)
  echo "$REQS / ($t1 - $t0)" | bc -l
}

echo "== manifest requests/s (curl -Z, 32 in parallel, $REQS per run, median of $RUNS)"
declare -A RPS
for name in strata-pg:$SPG strata-sqlite:$SSQ docker:$DP strata-fs:$SFS docker-fs:$DFS; do
  for m in GET HEAD; do
    manifest_rps "${name#*:}" "$m" >/dev/null # warm-up
    RPS[${name%%:*}-$m]=$(for _ in $(seq "$RUNS"); do manifest_rps "${name#*:}" "$m"; done | median)
    printf '%-14s %-4s %8.0f req/s\n' "${name%%:*}" "$m" "${RPS[${name%%:*}-$m]}"
  done
done

echo "== one ${MIB} MiB blob (median of $RUNS; upload = POST + PUT, download = GET)"
BLOB=$B/blob; head -c "$((MIB << 20))" /dev/urandom >"$BLOB"
DIGEST=sha256:$(sha256sum "$BLOB" | cut -d' ' -f1)
for name in strata-pg:$SPG strata-sqlite:$SSQ docker:$DP strata-fs:$SFS docker-fs:$DFS; do
  port=${name#*:}; up=(); down=()
  for i in $(seq "$RUNS"); do
    t0=$(now); push_blob "$port" "bench/big$i" "$BLOB" >/dev/null; t1=$(now)
    curl -fsS -o "$B/got" "http://127.0.0.1:$port/v2/bench/big$i/blobs/$DIGEST"; t2=$(now)
    cmp -s "$B/got" "$BLOB" || { echo "$name: downloaded blob differs" >&2; exit 1; }
    rm -f "$B/got"
    up+=("$(echo "$MIB / ($t1 - $t0)" | bc -l)"); down+=("$(echo "$MIB / ($t2 - $t1)" | bc -l)")
    # Free the S3 server's memory for the next run.
    curl -fs -o /dev/null -X DELETE "http://127.0.0.1:$port/v2/bench/big$i/blobs/$DIGEST" || true
  done
  printf '%-14s upload %6.0f MiB/s  download %6.0f MiB/s\n' "${name%%:*}" \
    "$(printf '%s\n' "${up[@]}" | median)" "$(printf '%s\n' "${down[@]}" | median)"
done
