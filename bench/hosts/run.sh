#!/usr/bin/env bash
# Hosts over SSH: shipping an app change to servers that already have its base.
#
#   strata push APP --host H...            (only the blobs a host lacks)
#   docker save APP | ssh H docker load    (every layer, what Kamal-style scripts do)
#   registry round trip                    (strata push to a registry + strata pull on the host)
#
# Hosts are network namespaces with their own address and veth link, each running Debian's
# sshd (key auth) and its own dockerd and strata store; bytes on the wire are the tx bytes of
# the host's veth (SSH and TCP overhead included). Runs are interleaved (strata, docker,
# registry, strata, ...); the host is reset between runs without timing.
#
# Scenarios: one host at full speed; one host with the link capped at 100 Mbit/s (tc tbf);
# four hosts at 100 Mbit/s each, also with `--relay` (the hosts pass the blobs on to each
# other; the bytes of that scenario are the bytes leaving the developer's side, counted by an
# nftables counter on its output hook apart from what it only forwards between hosts); a
# no-op ship; a fresh 1 GB image (throughput); a ship killed with kill -9 and retried (bytes
# sent again).
#
#   bench/hosts/run.sh [RUNS]          # RUNS per scenario (default 3)
#   SYNTH=1 bench/hosts/run.sh         # a synthetic base (300 MB) instead of examples/fly-go
#   RELAY_ONLY=1 SYNTH=1 bench/hosts/run.sh   # only four hosts: strata with and without relays
#                                             # (no docker needed)
#
# The default image is examples/fly-go (Debian 12 + golang, app = `go build`): needs network
# for debootstrap and apt-get once (DEBIAN_TAR=FILE reuses a debootstrap tarball). Needs root,
# sshd (openssh-server), docker.io, iproute2 (tc), runc, nftables, ssh-agent.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
runs=${1:-3}
tools="sshd ssh ssh-keygen ssh-agent ssh-add tc ip nft"
[ -n "${RELAY_ONLY:-}" ] || tools="$tools dockerd docker"
for t in $tools; do
    command -v "$t" >/dev/null || [ -x "/usr/sbin/$t" ] || { echo "needs $t" >&2; exit 1; }
done
target=${CARGO_TARGET_DIR:-$repo/target}
strata=${STRATA:-$target/release/strata}
[ -x "$strata" ] || cargo build --release -q -p strata

work=$(mktemp -d /tmp/strata-bench-hosts.XXXXXX)
nhosts=4
cleanup() {
    set +e
    for i in $(seq $nhosts); do
        [ -f "$work/h$i-docker.pid" ] && kill "$(cat "$work/h$i-docker.pid")"
        [ -f "$work/h$i-sshd.pid" ] && kill "$(cat "$work/h$i-sshd.pid")"
        ip netns pids "sbench$i" 2>/dev/null | xargs -r kill -9
        ip netns del "sbench$i" 2>/dev/null
    done
    [ -f "$work/local-docker.pid" ] && kill "$(cat "$work/local-docker.pid")"
    [ -n "${reg_pid:-}" ] && kill "$reg_pid"
    [ -n "${agent_pid:-}" ] && kill "$agent_pid"
    nft delete table inet strata_bench 2>/dev/null
    [ -n "${ip_forward:-}" ] && echo "$ip_forward" >/proc/sys/net/ipv4/ip_forward
    sleep 2
    # dockerd leaves its data roots mounted.
    grep -o " $work/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

# --- the developer's side: the image, v1 (the hosts' current one) and v2 (the change) ---
export STRATA_STORE=$work/store
S="$strata --store $STRATA_STORE"
if [ -n "${SYNTH:-}" ]; then
    mkdir -p "$work/base/data" "$work/app"
    cp -a /bin/busybox "$work/base/"
    for i in $(seq 30); do head -c 10M /dev/urandom >"$work/base/data/f$i"; done
    tar -C "$work/base" -cf "$work/base.tar" .
    $S import "$work/base.tar" base:1 >/dev/null
    mk_app() { head -c 3M /dev/urandom >"$work/app/payload"
        printf 'FROM base:1\nCOPY payload /app/payload\n' >"$work/app/Dockerfile"
        $S build -t "app:$1" "$work/app" >/dev/null 2>&1; }
    mk_app 1
    mk_app 2
    base=base:1
else
    command -v debootstrap >/dev/null || { echo "needs debootstrap (or SYNTH=1)" >&2; exit 1; }
    tarball=${DEBIAN_TAR:-$work/debian12.tar}
    DEBIAN_TAR=$tarball scripts/fly-example/make-debian-base.sh "$strata" >/dev/null
    cp -a examples/fly-go "$work/proj"
    rm -f "$work/proj/strata.lock"
    (cd "$work/proj" && $S build --progress plain >/dev/null 2>&1)
    $S tag go-fly-a-site app:1
    sed -i "/Fprintln/s/Hello, world![^\"]*/Hello, world! v2/" "$work/proj/main.go"
    (cd "$work/proj" && $S build --progress plain >/dev/null 2>&1)
    $S tag go-fly-a-site app:2
    base=go-fly-a-site-base:latest
fi
missing=$($S inspect --json app:2 | python3 -c '
import json,subprocess,sys
v=json.load(sys.stdin); m=v["manifest"]
b=json.loads(subprocess.check_output(sys.argv[1].split()+["inspect","--json","app:1"]))["manifest"]
have={l["digest"] for l in b["layers"]}|{b["config"]["digest"]}
own=[x for x in [m["config"]]+m["layers"] if x["digest"] not in have]
print(sum(x["size"] for x in own)+v["descriptor"]["size"])' "$S")
total=$($S inspect --json app:2 | python3 -c '
import json,sys
v=json.load(sys.stdin); m=v["manifest"]
print(sum(l["size"] for l in m["layers"])+m["config"]["size"]+v["descriptor"]["size"])')
echo "image: app:2 ($base + app change); blobs a host with app:1 lacks: $missing bytes; whole image: $total bytes"

# --- hosts ---
mkdir -p "$work/ssh" /run/sshd && chmod 700 "$work/ssh"
for k in id hostkey; do ssh-keygen -q -t ed25519 -N '' -f "$work/ssh/$k"; done
cp "$work/ssh/id.pub" "$work/ssh/authorized_keys"
# Host keys checked (a relay passes the keys the developer's side trusts on to the source).
echo "10.78.*.* $(cut -d' ' -f1,2 "$work/ssh/hostkey.pub")" >"$work/ssh/known_hosts"
cat >"$work/ssh/config" <<EOF
Host *
  User root
  IdentityFile $work/ssh/id
  IdentitiesOnly yes
  StrictHostKeyChecking yes
  UserKnownHostsFile $work/ssh/known_hosts
  GlobalKnownHostsFile /dev/null
  LogLevel ERROR
EOF
# Relays authenticate host to host with the developer's agent, forwarded.
export SSH_AUTH_SOCK=$work/ssh/agent.sock
ssh-agent -D -a "$SSH_AUTH_SOCK" >/dev/null 2>&1 &
agent_pid=$!
for _ in $(seq 50); do [ -S "$SSH_AUTH_SOCK" ] && break; sleep 0.1; done
ssh-add -q "$work/ssh/id"
export STRATA_SSH_COMMAND="ssh -F $work/ssh/config"
SSH="ssh -F $work/ssh/config"
toml=$work/strata.toml
: >"$toml"
for i in $(seq $nhosts); do
    ns=sbench$i
    ip netns del $ns 2>/dev/null || true
    ip netns add $ns
    ip link add sbh$i type veth peer name sbn$i
    ip link set sbn$i netns $ns
    ip addr add 10.78.$i.1/24 dev sbh$i && ip link set sbh$i up
    ip netns exec $ns sh -c "ip link set lo up; ip addr add 10.78.$i.2/24 dev sbn$i; ip link set sbn$i up; ip route add default via 10.78.$i.1"
    mkdir -p "$work/h$i-home"
    cat >"$work/h$i-sshd.conf" <<EOF
ListenAddress 10.78.$i.2:22
HostKey $work/ssh/hostkey
PidFile $work/h$i-sshd.pid
AuthorizedKeysFile $work/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
UsePAM no
StrictModes no
SetEnv HOME=$work/h$i-home STRATA_STORE=$work/h$i-store DOCKER_HOST=unix://$work/h$i-docker.sock
EOF
    nsenter --net=/run/netns/$ns /usr/sbin/sshd -f "$work/h$i-sshd.conf"
    printf '[host.h%s]\nssh = "root@10.78.%s.2"\nstrata = "%s"\n' "$i" "$i" "$strata" >>"$toml"
    [ -n "${RELAY_ONLY:-}" ] && continue
    nsenter --net=/run/netns/$ns dockerd --host "unix://$work/h$i-docker.sock" \
        --data-root "$work/h$i-docker" --exec-root "$work/h$i-dexec" --pidfile "$work/h$i-docker.pid" \
        --iptables=false --bridge=none >"$work/h$i-docker.log" 2>&1 &
done
# The hosts reach each other through this namespace (relays); nftables counts what this
# namespace sends the hosts itself (output hook) apart from what it forwards between them.
ip_forward=$(cat /proc/sys/net/ipv4/ip_forward)
echo 1 >/proc/sys/net/ipv4/ip_forward
veths=$(for i in $(seq $nhosts); do printf '"sbh%s", ' "$i"; done)
nft add table inet strata_bench
nft add chain inet strata_bench from_here '{ type filter hook output priority 0; policy accept; }'
nft add chain inet strata_bench between '{ type filter hook forward priority 0; policy accept; }'
nft add rule inet strata_bench from_here oifname "{ ${veths%, } }" counter
nft add rule inet strata_bench between oifname "{ ${veths%, } }" counter accept
counter() { nft list chain inet strata_bench "$1" | grep -o 'bytes [0-9]*' | cut -d' ' -f2; }
for _ in $(seq 100); do
    ok=1
    for h in $(seq $nhosts); do
        (exec 3<>/dev/tcp/10.78.$h.2/22) 2>/dev/null || ok=0
    done
    [ $ok = 1 ] && break
    sleep 0.1
done

reg_port=$((20000 + $$ % 10000))
if [ -z "${RELAY_ONLY:-}" ]; then
dockerd --host "unix://$work/local-docker.sock" --data-root "$work/local-docker" \
    --exec-root "$work/local-dexec" --pidfile "$work/local-docker.pid" \
    --iptables=false --bridge=none >"$work/local-docker.log" 2>&1 &
LD="docker -H unix://$work/local-docker.sock"
for i in $(seq 100); do
    ok=1
    for h in $(seq $nhosts) local; do
        [ "$h" = local ] && sock=$work/local-docker.sock || sock=$work/h$h-docker.sock
        docker -H "unix://$sock" info >/dev/null 2>&1 || ok=0
    done
    [ $ok = 1 ] && break
    sleep 0.3
done
$S save app:1 | $LD load -q >/dev/null
$S save app:2 | $LD load -q >/dev/null

# A registry on the hosts' side of every link (for the round trip).
$strata registry serve --root "$work/registry" --addr "0.0.0.0:$reg_port" >"$work/registry.log" 2>&1 &
reg_pid=$!
sleep 1

# Seed every host with app:1 (its base and the app as it was), for strata and for docker.
for i in $(seq $nhosts); do
    $S push app:1 --host h$i --project "$toml" >/dev/null 2>&1
    $LD save app:1 | $SSH 10.78.$i.2 docker load -q >/dev/null
done
else
for i in $(seq $nhosts); do $S push app:1 --host h$i --project "$toml" 2>&1 >/dev/null | tail -1; done
fi

tx() { cat /sys/class/net/sbh$1/statistics/tx_bytes; }
now() { date +%s%N; }
reset_host() { # forget app:2 on host $1 (strata and docker); the base stays
    $SSH 10.78.$1.2 "$strata rmi app:2 >/dev/null 2>&1; $strata rmi 10.78.$1.1:$reg_port/bench/app:2 >/dev/null 2>&1; $strata gc >/dev/null 2>&1; docker rmi -f app:2 >/dev/null 2>&1; true"
}
reset_registry() { # a registry holding app:1 only
    kill "$reg_pid"; wait "$reg_pid" 2>/dev/null || true
    rm -rf "$work/registry"
    $strata registry serve --root "$work/registry" --addr "0.0.0.0:$reg_port" >"$work/registry.log" 2>&1 &
    reg_pid=$!
    for _ in $(seq 50); do curl -sf "http://127.0.0.1:$reg_port/v2/" >/dev/null && break; sleep 0.1; done
    $S push app:1 "127.0.0.1:$reg_port/bench/app:1" >/dev/null 2>&1
}

results=$work/results.txt
: >"$results"
record() { echo "$1 $2 $3" >>"$results"; } # scenario+tool, seconds, bytes

ship() { # $1 scenario, $2 tool, hosts...
    local sc=$1 tool=$2; shift 2
    local hosts=("$@") before=() t0 t1 bytes=0 out0 fwd0
    for h in "${hosts[@]}"; do reset_host "$h"; done
    [ "$tool" = registry ] && reset_registry
    for h in "${hosts[@]}"; do before[$h]=$(tx "$h"); done
    out0=$(counter from_here) fwd0=$(counter between)
    t0=$(now)
    case $tool in
    strata|strata-relay)
        args=()
        for h in "${hosts[@]}"; do args+=(--host "h$h"); done
        [ "$tool" = strata-relay ] && args+=(--relay)
        $S push app:2 "${args[@]}" --project "$toml" >/dev/null 2>&1 ;;
    docker)
        pids=()
        for h in "${hosts[@]}"; do
            $LD save app:2 | $SSH 10.78.$h.2 docker load -q >/dev/null &
            pids+=($!)
        done
        wait "${pids[@]}" ;;
    registry)
        $S push app:2 "127.0.0.1:$reg_port/bench/app:2" >/dev/null 2>&1
        pids=()
        for h in "${hosts[@]}"; do
            $SSH 10.78.$h.2 "$strata pull --insecure 10.78.$h.1:$reg_port/bench/app:2" >/dev/null 2>&1 &
            pids+=($!)
        done
        wait "${pids[@]}" ;;
    esac
    t1=$(now)
    for h in "${hosts[@]}"; do bytes=$((bytes + $(tx "$h") - before[$h])); done
    # Several hosts: the bytes leaving this side (forwarded ones apart, in relays.txt).
    if [ ${#hosts[@]} -gt 1 ]; then
        bytes=$(($(counter from_here) - out0))
        echo "$sc/$tool forwarded between hosts: $(($(counter between) - fwd0))" >>"$work/relays.txt"
    fi
    record "$sc/$tool" "$(echo "scale=3; ($t1 - $t0) / 1000000000" | bc)" "$bytes"
}

limit() { for h in "$@"; do tc qdisc replace dev sbh$h root tbf rate 100mbit burst 256kb latency 400ms; done; }
unlimit() { for h in $(seq $nhosts); do tc qdisc del dev sbh$h root 2>/dev/null || true; done; }

uptime
: >"$work/relays.txt"
if [ -z "${RELAY_ONLY:-}" ]; then
echo "==> one host, full speed ($runs interleaved runs)"
for r in $(seq "$runs"); do for tool in strata docker registry; do ship 1host "$tool" 1; done; done
echo "==> one host at 100 Mbit/s"
limit 1
for r in $(seq "$runs"); do for tool in strata docker registry; do ship 1host-100mbit "$tool" 1; done; done
fi
echo "==> four hosts at 100 Mbit/s each"
limit 1 2 3 4
tools4="strata strata-relay docker registry"
[ -n "${RELAY_ONLY:-}" ] && tools4="strata strata-relay"
for r in $(seq "$runs"); do for tool in $tools4; do ship 4hosts-100mbit "$tool" 1 2 3 4; done; done
unlimit

if [ -z "${RELAY_ONLY:-}" ]; then

echo "==> no-op ship (the host has app:2)"
$S push app:2 --host h1 --project "$toml" >/dev/null 2>&1
for r in $(seq 10); do
    b=$(tx 1); t0=$(now)
    $S push app:2 --host h1 --project "$toml" >/dev/null 2>&1
    t1=$(now)
    record noop/strata "$(echo "scale=3; ($t1 - $t0) / 1000000000" | bc)" $(($(tx 1) - b))
done

echo "==> a fresh 1 GB image (throughput over loopback-speed veth)"
head -c 1000M /dev/urandom >"$work/big.bin"
mkdir -p "$work/bigctx" && mv "$work/big.bin" "$work/bigctx/big.bin"
tar -C "$work/bigctx" -cf "$work/big.tar" .
rm -rf "$work/bigctx"
$S import --compression none "$work/big.tar" big:1 >/dev/null
rm -f "$work/big.tar"
bigsize=$($S inspect --json big:1 | python3 -c 'import json,sys; m=json.load(sys.stdin)["manifest"]; print(sum(l["size"] for l in m["layers"]))')
for r in $(seq "$runs"); do
    $SSH 10.78.2.2 "$strata rmi big:1 >/dev/null 2>&1; $strata gc >/dev/null 2>&1; true"
    b=$(tx 2); t0=$(now)
    $S push big:1 --host h2 --project "$toml" >/dev/null 2>&1
    t1=$(now)
    record 1gb/strata "$(echo "scale=3; ($t1 - $t0) / 1000000000" | bc)" $(($(tx 2) - b))
done

echo "==> kill -9 mid-ship, then retry"
for r in $(seq "$runs"); do
    $SSH 10.78.3.2 "$strata rmi big:1 >/dev/null 2>&1; $strata gc >/dev/null 2>&1; rm -rf \$STRATA_STORE/strata/partial; true"
    limit 3
    $S push big:1 --host h3 --project "$toml" >/dev/null 2>&1 &
    pid=$!
    sleep 8
    kill -9 $pid; wait $pid 2>/dev/null || true
    sleep 1
    held=$(du -sb "$work/h3-store/strata/partial" 2>/dev/null | cut -f1)
    unlimit
    b=$(tx 3); t0=$(now)
    $S push big:1 --host h3 --project "$toml" >/dev/null 2>&1
    t1=$(now)
    echo "resume: host held $held of $bigsize bytes" >>"$work/resume.txt"
    record resume/strata "$(echo "scale=3; ($t1 - $t0) / 1000000000" | bc)" $(( $(tx 3) - b - (bigsize - held) ))
done

fi

echo
echo "missing blobs of app:2 on a host with app:1: $missing bytes; 1 GB image layer: ${bigsize:-} bytes"
cat "$work/resume.txt" 2>/dev/null || true
python3 -c '
import statistics, sys
from collections import defaultdict
f = defaultdict(list)
for line in open(sys.argv[1]):
    k, n = line.rsplit(" ", 1)
    f[k].append(int(n))
for k, v in f.items():
    print(f"{k} (median): {int(statistics.median(v))}")' "$work/relays.txt"
python3 - "$results" "$missing" "${bigsize:-1}" <<'EOF'
import statistics, sys
from collections import defaultdict
rows = defaultdict(list)
for line in open(sys.argv[1]):
    k, s, b = line.split()
    rows[k].append((float(s), int(b)))
missing, big = int(sys.argv[2]), int(sys.argv[3])
print("| scenario | tool | median s | median bytes on the wire (4 hosts: leaving this side) | bytes / (missing x hosts) | vs strata (time) |")
print("|---|---|---|---|---|---|")
base = {}
for k in rows:
    sc, tool = k.split("/")
    s = statistics.median(x[0] for x in rows[k])
    b = statistics.median(x[1] for x in rows[k])
    if tool == "strata":
        base[sc] = s
for k in rows:
    sc, tool = k.split("/")
    s = statistics.median(x[0] for x in rows[k])
    b = statistics.median(x[1] for x in rows[k])
    hosts = 4 if sc.startswith("4hosts") else 1
    if sc in ("1host", "1host-100mbit", "4hosts-100mbit"):
        ratio = f"{b / (missing * hosts):.3f}"
    elif sc == "1gb":
        ratio = f"{b / big:.3f} ({big / s / 1e9:.2f} GB/s)"
    elif sc == "resume":
        ratio = "bytes = resent beyond the unfinished part"
    else:
        ratio = "-"
    vs = f"{s / base[sc]:.2f}x" if sc in base else "-"
    print(f"| {sc} | {tool} | {s:.3f} | {int(b)} | {ratio} | {vs} |")
EOF
