#!/usr/bin/env bash
# strata dev: latency from a file save to an HTTP answer that shows the change, over TRIALS
# saves of a synced file (p50, p99), next to a full `strata deploy` of the same change
# (rebuild, new machine, health check, switch).
#
#   bench/dev/run.sh [TRIALS]      # default 200; needs root, runc, tini-static, busybox-static
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
trials=${1:-200}
target=${CARGO_TARGET_DIR:-$repo/target}
strata=${STRATA:-$target/release/strata}
[ -x "$strata" ] || cargo build --release -q -p strata
work=$(mktemp -d /tmp/strata-bench-dev.XXXXXX)
export STRATA_STORE=$work/store
S="$strata"
port=$((18000 + $$ % 1000))
cleanup() {
    set +e
    [ -n "${dev_pid:-}" ] && kill -INT "$dev_pid" && wait "$dev_pid"
    for id in $($S ps --json 2>/dev/null | python3 -c 'import json,sys; [print(json.loads(l)["id"]) for l in sys.stdin]'); do
        $S machine destroy "$id" >/dev/null 2>&1
    done
    $S agent stop >/dev/null 2>&1
    rm -rf "$work"
}
trap cleanup EXIT

# A busybox base image, and an app serving site/ with busybox httpd.
mkdir -p "$work/rootfs/bin" "$work/rootfs/etc" "$work/proj/site"
cp /bin/busybox "$work/rootfs/bin/"
for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox "$work/rootfs/bin/$a"; done
echo 'root:x:0:0:root:/root:/bin/sh' >"$work/rootfs/etc/passwd"
tar -C "$work/rootfs" -cf "$work/rootfs.tar" .
$S import "$work/rootfs.tar" busybox >/dev/null 2>&1
echo v0 >"$work/proj/site/index.html"
cat >"$work/proj/Dockerfile" <<'DOCKERFILE'
FROM busybox
COPY site/ /www/
CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]
DOCKERFILE
cat >"$work/proj/strata.toml" <<TOML
[[image]]
name = "web"

[app.web]
image = "web"
port = 8080
public_port = $port
kill_timeout = "1s"
health = { path = "/", interval = "50ms", timeout = "1s", deadline = "10s" }
live_update = { sync = [{ src = "site", dest = "/www" }] }
TOML

uptime
echo "==> full deploy of a one-file change (5 runs)"
for i in 1 2 3 4 5; do
    echo "deploy $i" >"$work/proj/site/index.html"
    /usr/bin/time -f "%e" -a -o "$work/deploy.txt" $S deploy web --project "$work/proj" --detach >/dev/null 2>&1
done

echo "==> strata dev: $trials saves"
$S dev web --project "$work/proj" --progress plain 2>"$work/dev.log" &
dev_pid=$!
for _ in $(seq 600); do grep -q watching "$work/dev.log" 2>/dev/null && break; sleep 0.1; done
python3 - "$work/proj/site/index.html" "$port" "$trials" "$work/deploy.txt" <<'PY'
import http.client, os, statistics, sys, time
path, port, trials, deploys = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def get():
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        c.request("GET", "/")
        body = c.getresponse().read().decode()
        c.close()
        return body
    except OSError:
        return None
lat = []
for i in range(trials):
    want = f"trial {i} {time.time_ns()}\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(want)
    t0 = time.perf_counter()
    os.rename(tmp, path)  # an editor's atomic save
    while get() != want:
        if time.perf_counter() - t0 > 10:
            sys.exit(f"trial {i}: the change never showed")
        time.sleep(0.001)
    lat.append((time.perf_counter() - t0) * 1000)
    time.sleep(0.05)
lat.sort()
p = lambda q: lat[min(len(lat) - 1, int(round(q * (len(lat) - 1))))]
d = sorted(float(x) for x in open(deploys).read().split())
print(f"| save → served, strata dev ({trials} saves) | p50 {p(0.5):.0f} ms | p99 {p(0.99):.0f} ms | max {lat[-1]:.0f} ms |")
print(f"| full strata deploy of the same change ({len(d)} runs) | median {statistics.median(d)*1000:.0f} ms | | max {d[-1]*1000:.0f} ms |")
PY
