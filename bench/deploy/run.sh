#!/usr/bin/env bash
# Deploy benchmarks (issue 5), as root:
#  1. time from `strata machine run` to the machine's first output line, cached image, next to
#     a bare `runc run` of a prepared bundle and `podman run` (when installed);
#  2. a redeploy of examples/tilt-base-image after a one-file change: `strata deploy` (build +
#     push to the embedded registry + new machine + health + switch) vs the same by hand with
#     `buildah bud` + `skopeo copy` + `podman run` (when podman is installed).
#
#   bench/deploy/run.sh [RUNS]      # default 15
#   PART=first bench/deploy/run.sh  # only 1 (PART=redeploy: only 2)
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
runs=${1:-15}
target=${CARGO_TARGET_DIR:-$repo/target}
strata=${STRATA:-$target/release/strata}
[ -x "$strata" ] || cargo build --release -q -p strata
work=$(mktemp -d /tmp/strata-bench-deploy.XXXXXX)
work=$(echo "$work" | tr 'A-Z' 'a-z'); mkdir -p "$work"
export STRATA_STORE=$work/store
cleanup() {
    "$strata" apps destroy tilt-app >/dev/null 2>&1 || true
    for id in $("$strata" machine list --json 2>/dev/null | sed 's/.*"id":"\([^"]*\)".*/\1/'); do
        "$strata" machine destroy "$id" >/dev/null 2>&1 || true
    done
    "$strata" agent stop >/dev/null 2>&1 || true
    [ -n "${registry_pid:-}" ] && kill "$registry_pid" 2>/dev/null || true
    podman rm -f app >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/rootfs/bin" "$work/rootfs/etc" "$work/rootfs/tmp"
cp /bin/busybox "$work/rootfs/bin/"
for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$work/rootfs/bin/$a"; done
echo 'root:x:0:0:root:/root:/bin/sh' >"$work/rootfs/etc/passwd"
echo 'root:x:0:' >"$work/rootfs/etc/group"
tar -C "$work/rootfs" -cf "$work/rootfs.tar" .
"$strata" import "$work/rootfs.tar" busybox:latest --change 'CMD ["sh"]' >/dev/null

part=${PART:-all}
if [ "$part" != redeploy ]; then
echo "## first output line (load: $(cut -d' ' -f1-3 /proc/loadavg))"
# A prepared runc bundle: the floor any runc-based tool stands on.
mkdir -p "$work/bundle" && cp -a "$work/rootfs" "$work/bundle/rootfs"
(cd "$work/bundle" && runc spec && sed -i 's/"terminal": true/"terminal": false/; s/"sh"/"echo", "ready"/' config.json)
extra=(--runc-bundle "$work/bundle")
podman_ok=false
if command -v podman >/dev/null; then
    podman pull -q "oci:$STRATA_STORE:busybox:latest" >/dev/null
    podman tag "$(podman images -q | head -1)" localhost/busybox:latest
    # Some sandboxes refuse the rlimits podman sets ("error setting rlimit ... operation not
    # permitted"): then podman cannot run containers here at all.
    if podman run --rm --network host localhost/busybox:latest true >/dev/null 2>&1; then
        podman_ok=true
        extra+=(--podman)
    else
        echo "podman is installed but cannot run a container here: podman rows skipped"
    fi
fi
if command -v dockerd >/dev/null && command -v docker >/dev/null; then
    # A private engine, as the interop tests start it (no bridge, no iptables).
    mkdir -p "$work/docker-data" "$work/docker-exec"
    echo '{}' >"$work/docker.json"
    dockerd --iptables=false --bridge=none --config-file "$work/docker.json" \
        --host "unix://$work/docker.sock" --data-root "$work/docker-data" \
        --exec-root "$work/docker-exec" --pidfile "$work/docker.pid" >"$work/dockerd.log" 2>&1 &
    export DOCKER_HOST=unix://$work/docker.sock
    for _ in $(seq 300); do docker info >/dev/null 2>&1 && break; sleep 0.2; done
    "$strata" save busybox:latest -o "$work/busybox-docker.tar"
    docker load -q -i "$work/busybox-docker.tar" >/dev/null
    docker run --rm --network host busybox:latest true
    extra+=(--docker)
fi
python3 bench/deploy/first_output.py "$strata" "$STRATA_STORE" "$runs" "${extra[@]}"
if [ -n "${DOCKER_HOST:-}" ]; then
    kill "$(cat "$work/docker.pid")" 2>/dev/null || true
    for _ in $(seq 100); do [ -e "$work/docker.pid" ] || break; sleep 0.2; done
    # dockerd leaves its netns mount behind; the work dir cannot be removed under it.
    grep -o " $work[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount 2>/dev/null || true
    unset DOCKER_HOST
fi

fi
[ "$part" = first ] && exit 0

echo "## redeploy after a one-file change (load: $(cut -d' ' -f1-3 /proc/loadavg))"
"$strata" registry serve --addr 127.0.0.1:5099 --root "$work/registry" >/dev/null 2>&1 &
registry_pid=$!
for _ in $(seq 100); do curl -sf http://127.0.0.1:5099/v2/ >/dev/null 2>&1 && break; sleep 0.1; done
cp -r examples/tilt-base-image "$work/proj"
cd "$work/proj"
"$strata" deploy tilt-app --progress plain >/dev/null 2>&1
cat >"$work/strata.sh" <<EOS
set -e
cd "$work/proj"
sed -i "s/<h1>.*<\/h1>/<h1>\$RANDOM\$RANDOM<\/h1>/" src/index.html
"$strata" deploy tilt-app --progress plain >/dev/null 2>&1
EOS
hyperfine -N --runs "$runs" --export-json "$work/strata-redeploy.json" "bash $work/strata.sh" 2>&1 | grep -E "Time|Range"
strata_med=$(python3 -c "import json,statistics;print(statistics.median(json.load(open('$work/strata-redeploy.json'))['results'][0]['times']))")
echo "strata deploy (build + push + machine + health + switch): median ${strata_med}s"
curl -sf http://127.0.0.1:18080/ | head -1

if command -v buildah >/dev/null && command -v skopeo >/dev/null; then
    # By hand: build both images with buildah (layers cached), push the app with skopeo, replace
    # the container with podman. Uses podman's own storage so `podman run` sees the image.
    printf 'package\nstrata.toml\nstrata.lock\n*.Dockerfile\n' >.dockerignore
    buildah pull -q "oci:$STRATA_STORE:busybox:latest" >/dev/null
    buildah tag "$(buildah images -q | head -1)" localhost/busybox:latest
    buildah bud --layers -q --isolation chroot -f base.Dockerfile -t tilt-base package >/dev/null
    cat >"$work/byhand.sh" <<EOS
set -e
cd "$work/proj"
sed -i "s/<h1>.*<\/h1>/<h1>\$RANDOM\$RANDOM<\/h1>/" src/index.html
buildah bud --layers -q --isolation chroot -t tilt-app . >/dev/null
skopeo copy -q --dest-tls-verify=false containers-storage:localhost/tilt-app:latest docker://127.0.0.1:5099/personal/tilt-app:byhand
if $podman_ok; then
    podman rm -f -t 2 app >/dev/null 2>&1 || true
    podman run -d --name app --network host localhost/tilt-app:latest >/dev/null
fi
EOS
    $podman_ok || echo "(by hand without the podman run step: podman cannot run containers here)"
    hyperfine -N --runs "$runs" --export-json "$work/byhand.json" "bash $work/byhand.sh" 2>&1 | grep -E "Time|Range"
    hand_med=$(python3 -c "import json,statistics;print(statistics.median(json.load(open('$work/byhand.json'))['results'][0]['times']))")
    echo "buildah bud + skopeo copy + podman run: median ${hand_med}s; ratio strata/by-hand: $(python3 -c "print(round($strata_med/$hand_med,2))")"
else
    echo "buildah/skopeo not installed: by-hand comparison skipped"
fi
