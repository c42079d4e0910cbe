#!/usr/bin/env bash
# Build cache through a registry: examples/fly-go (a Debian 12 base that installs golang with
# apt-get, and the app FROM it) built once with its cache exported, then built again on a fresh
# store that has only debian:12, nothing changed. strata (`--cache-to`/`--cache-from` on
# strata's embedded registry) next to BuildKit's inline cache (Debian's Docker 20.10,
# `DOCKER_BUILDKIT=1 docker build --build-arg BUILDKIT_INLINE_CACHE=1`, pushed to the same
# registry, then `--cache-from` in an engine whose images and build cache were removed).
# Interleaved rounds; prints each round, the medians and their ratio, and strata's bytes
# fetched. Also times the export itself: the first build with and without `--cache-to`.
#
#   bench/cache/run.sh [ROUNDS]          # default 3; needs root, network (debootstrap once,
#                                        # apt-get in the first builds), runc, docker.io
#   DEBIAN_TAR=FILE bench/cache/run.sh   # reuses a debootstrap tarball
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
rounds=${1:-3}
for t in dockerd runc python3 curl; do
    command -v "$t" >/dev/null || { echo "needs $t" >&2; exit 1; }
done
target=${CARGO_TARGET_DIR:-$repo/target}
strata=${STRATA:-$target/release/strata}
[ -x "$strata" ] || cargo build --release -q -p strata
work=$(mktemp -d /tmp/strata-bench-cache.XXXXXX)
sock=$work/docker.sock
reg_pid= dockerd_pid= proxy_pid=
cleanup() {
    set +e
    [ -n "$dockerd_pid" ] && kill "$dockerd_pid" && wait "$dockerd_pid" 2>/dev/null
    [ -n "$reg_pid" ] && kill "$reg_pid" && wait "$reg_pid" 2>/dev/null
    [ -n "$proxy_pid" ] && kill "$proxy_pid" && wait "$proxy_pid" 2>/dev/null
    umount -R "$work/docker" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
tarball=${DEBIAN_TAR:-$work/debian12.tar}
now() { date +%s.%N; }
since() { python3 -c "print(round($(now) - $1, 2))"; }

# The reference store: debian:12 only.
STRATA_STORE=$work/ref DEBIAN_TAR=$tarball scripts/fly-example/make-debian-base.sh "$strata" >/dev/null
"$strata" --store "$work/ref" save debian:12 -o "$work/debian.tar"
fresh_store() { # $1: store dir, holding debian:12 only
    rm -rf "$1"
    "$strata" --store "$1" load -i "$work/debian.tar" >/dev/null
}

# strata's embedded registry, plain HTTP on loopback.
port=$((15000 + $$ % 1000))
"$strata" --store "$work/regstore" registry serve --addr "127.0.0.1:$port" --root "$work/registry" \
    >"$work/registry.log" 2>&1 &
reg_pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
# Every client reaches it through a relay that counts the bytes they receive.
pport=$((port + 1)) sport=$((port + 2))
python3 bench/cache/countproxy.py "$pport" "$port" "$sport" &
proxy_pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$pport/v2/" >/dev/null && break; sleep 0.1; done
reg=127.0.0.1:$pport
down() { python3 -c "import socket; s=socket.create_connection(('127.0.0.1', $sport)); print(s.recv(100).split()[1].decode())"; }

# A private Docker engine; 127.0.0.1 registries are plain HTTP for it by default.
mkdir -p "$work/docker"
dockerd --iptables=false --bridge=none --host "unix://$sock" --data-root "$work/docker" \
    --exec-root "$work/docker-exec" --pidfile "$work/docker.pid" >"$work/dockerd.log" 2>&1 &
dockerd_pid=$!
export DOCKER_HOST=unix://$sock DOCKER_BUILDKIT=1
for _ in $(seq 100); do /usr/bin/docker info >/dev/null 2>&1 && break; sleep 0.2; done
D=/usr/bin/docker
$D load -i "$work/debian.tar" >/dev/null

cp -a examples/fly-go "$work/proj"
rm -f "$work/proj/strata.lock"
printf 'strata.toml\nstrata.lock\n*.Dockerfile\n' >"$work/proj/.dockerignore"
# The Fly flow, `deploy --build-only` to the registry the cache is in (the image is used from
# there, not run here): a copy of the project with the cache and the app's registry set.
cp -a "$work/proj" "$work/proj-push"
sed -i "s|^\[\[image\]\]|[cache]\nregistry = \"$reg/team/cache\"\n\n&|;T;:a;n;ba" "$work/proj-push/strata.toml"
sed -i "s|^port = 8080|&\nregistry = \"$reg/team\"|" "$work/proj-push/strata.toml"
strata_push() { # $1: store
    (cd "$work/proj-push" && "$strata" --store "$1" deploy go-fly-a-site --build-only --progress plain 2>&1 >/dev/null | grep 'build cache' || true)
}

strata_build() { # $1: store, rest: extra flags; prints the cache summary line
    (cd "$work/proj" && "$strata" --store "$1" build --progress plain "${@:2}" 2>&1 >/dev/null | grep 'build cache' || true)
}
docker_build() { # rest: extra flags
    (cd "$work/proj" &&
        $D build -q --network host --build-arg BUILDKIT_INLINE_CACHE=1 "$@" -t "$reg/team/fly-base:1" \
            -f base.Dockerfile . >/dev/null &&
        sed "s|^FROM go-fly-a-site-base|FROM $reg/team/fly-base:1|" Dockerfile >"$work/app.Dockerfile" &&
        $D build -q --network host --build-arg BUILDKIT_INLINE_CACHE=1 "${@/fly-base/fly-app}" \
            -t "$reg/team/fly-app:1" -f "$work/app.Dockerfile" . >/dev/null)
}
docker_reset() { # the engine keeps debian:12 only
    $D rmi -f "$reg/team/fly-base:1" "$reg/team/fly-app:1" >/dev/null 2>&1 || true
    $D builder prune -af >/dev/null 2>&1 || true
}

echo "==> first builds: the cache is made and exported (apt-get runs here)"
fresh_store "$work/s0"
t=$(now); strata_build "$work/s0" >/dev/null; echo "strata cold, no export: $(since "$t") s"
fresh_store "$work/s1"
t=$(now); line=$(strata_build "$work/s1" --cache-to "$reg/team/cache"); echo "strata cold, --cache-to: $(since "$t") s ($line)"
t=$(now); docker_build; $D push -q "$reg/team/fly-base:1" >/dev/null; $D push -q "$reg/team/fly-app:1" >/dev/null
echo "buildkit cold + push (inline cache): $(since "$t") s"
uptime

: >"$work/times"
for r in $(seq "$rounds"); do
    fresh_store "$work/s2"
    d0=$(down); t=$(now); line=$(strata_build "$work/s2" --cache-from "$reg/team/cache"); ts=$(since "$t")
    ds=$(($(down) - d0))
    echo "round $r strata build: $ts s, $ds bytes down ($line)"
    fresh_store "$work/s3"
    d0=$(down); t=$(now); line=$(strata_push "$work/s3"); tp=$(since "$t"); dp=$(($(down) - d0))
    echo "round $r strata deploy --build-only: $tp s, $dp bytes down ($line)"
    docker_reset
    d0=$(down); t=$(now); docker_build --cache-from "$reg/team/fly-base:1"; tb=$(since "$t")
    db=$(($(down) - d0))
    echo "round $r buildkit: $tb s, $db bytes down"
    echo "$ts $tb $tp $ds $dp $db" >>"$work/times"
done
uptime
python3 - "$work/times" <<'EOF'
import statistics, sys
rows = [tuple(map(float, l.split())) for l in open(sys.argv[1])]
s = statistics.median(r[0] for r in rows)
b = statistics.median(r[1] for r in rows)
print(f"no-change build on a fresh store: strata median {s:.2f} s, BuildKit median {b:.2f} s, "
      f"{s / b:.2f}x; per-round ratios {[round(r[0] / r[1], 2) for r in rows]}")
p = statistics.median(r[2] for r in rows)
print(f"strata deploy --build-only (layers stay in the registry): median {p:.2f} s, "
      f"{p / b:.2f}x BuildKit; bytes down: strata build {statistics.median(r[3] for r in rows):.0f}, "
      f"deploy --build-only {statistics.median(r[4] for r in rows):.0f}, "
      f"BuildKit {statistics.median(r[5] for r in rows):.0f}")
EOF
