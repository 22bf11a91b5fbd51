#!/usr/bin/env bash
# Data-plane benchmark: ztmesh (standalone `tunnel` and agent mode) against
# wireguard-go and boringtun-cli, in ONE run, on the same veth.
#
#   namespace A (sender)                      namespace B (receiver)
#   veth 198.18.0.1/24  <------------------>  veth 198.18.0.2/24
#   tunnel 100.64.0.1/32 (MTU 1420)           tunnel 100.64.0.2/32 (MTU 1420)
#   iperf3 -c / ping                          iperf3 -s -1
#   [agent mode: ztmesh-controller on 198.18.0.1:8443; overlay addresses
#    from the controller, inside 100.64.0.0/10]
#
# For every implementation (fresh namespaces each time): iperf3 TCP 1 stream
# and 4 streams (10 s each), iperf3 UDP with 64-byte payloads at full rate
# (packets/s received), ping RTT (median of 20) on the idle tunnel, and the CPU
# seconds (utime+stime) the tunnel processes of both sides used during the
# 1-stream TCP test, and the whole host's busy CPU over the same test. Prints
# one table of medians over REPS repetitions (min–max for the headline
# figures), with ratios against wireguard-go, and the cost per byte: tunnel
# cores per Gbit/s (both tunnel processes; the kernel's part of it, their
# stime, in its own column) and host cores per Gbit/s.
#
# With MANY=N (N >= 2) it also runs the many-peers test for `ztmesh tunnel`:
# one server namespace and N client namespaces on one bridge, each client one
# iperf3 TCP stream to the server at once, and the same with one client; it
# reports the server tunnel's cores per Gbit/s for both and their ratio.
#
# Needs root, iperf3, ping, wireguard-go, wg (wireguard-tools), jq, and
# release builds of ztmesh and ztmesh-controller (cargo build --release).
# boringtun-cli is taken from target/bench-tools/bin (see README.md).
#
# Environment:
#   REPS=3            repetitions of the whole suite (table shows medians)
#   IMPLS="..."       subset, in order, of: bare ztmesh ztmesh0 agent agent0 wggo bt bt1
#                     (IMPLS="" runs only the MANY test)
#   TCP_SECS=10 UDP_SECS=5 PINGS=20
#   BIN=target/release  where ztmesh and ztmesh-controller are
#   BASE_BIN=DIR      binaries of a baseline build (e.g. an earlier commit);
#                     implementation `agent0` runs agent mode with them, so a
#                     change is measured side by side with its baseline;
#                     `ztmesh0` does the same for the standalone tunnel
#   MANY=0            clients of the many-peers test (0: skip; e.g. MANY=8)
#   BORINGTUN=...     boringtun-cli binary
#   MEM_PEERS=10000   also measure `ztmesh tunnel` RSS with 1 and with this many
#                     peers (random keys, distinct /32s; 0: skip; needs python3)
#   AGENT_METRICS=1   agent mode (not agent0) runs its daemons with
#                     --metrics-listen 127.0.0.1:9465 and scrapes each once a
#                     second during the run (the metrics' cost is measured;
#                     the flow log is always on in agent mode)
#   OUT=FILE          also write the raw samples (CSV) there
#   KEEP=1            keep the work dir (logs) for inspection
#   TCP_ONLY=1        only the 1-stream TCP test and its CPU per repetition
#                     (the other columns read 0): many short alternating
#                     repetitions resolve a cost-per-byte difference of a few
#                     percent on a VM whose steal time moves single runs more
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

REPS=${REPS:-3}
IMPLS=${IMPLS:-"bare ztmesh agent wggo bt bt1"}
TCP_SECS=${TCP_SECS:-10}
UDP_SECS=${UDP_SECS:-5}
PINGS=${PINGS:-20}
MEM_PEERS=${MEM_PEERS:-10000}
MANY=${MANY:-0}
TCP_ONLY=${TCP_ONLY:-0}
BIN=${BIN:-$ROOT/target/release}
BASE_BIN=${BASE_BIN:-}
BORINGTUN=${BORINGTUN:-$ROOT/target/bench-tools/bin/boringtun-cli}
MTU=1420
PORT=51820
IPERF_PORT=5201
CTL_PORT=8443

if [[ $EUID -ne 0 ]]; then
  echo "dataplane.sh: needs root (network namespaces, TUN devices)" >&2
  exit 1
fi
for tool in iperf3 ping jq wg ip timeout; do
  command -v "$tool" >/dev/null || { echo "dataplane.sh: $tool not found" >&2; exit 1; }
done

TAG="zb$$"
NS_A="$TAG-a"
NS_B="$TAG-b"
# Distinct interface names per side: wireguard-go and boringtun put their UAPI
# socket at /var/run/wireguard/IFNAME.sock, which all namespaces share.
IF_A="${TAG}a"
IF_B="${TAG}b"
UNDER_A=198.18.0.1
UNDER_B=198.18.0.2
OVER_A=100.64.0.1
OVER_B=100.64.0.2
CLK_TCK=$(getconf CLK_TCK)

WORK=$(mktemp -d /tmp/ztmbench.XXXXXX)
SAMPLES=$WORK/samples.csv
: >"$SAMPLES"
PIDS=()
NS_UP=0

log() { printf '== %s\n' "$*" >&2; }

stop_pids() {
  ((${#PIDS[@]})) || return 0
  kill -TERM "${PIDS[@]}" 2>/dev/null || true
  local i alive pid
  for i in $(seq 30); do # up to 3 s for a clean exit
    alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  kill -KILL "${PIDS[@]}" 2>/dev/null || true
  wait "${PIDS[@]}" 2>/dev/null || true
  PIDS=()
}

# Namespaces of the many-peers test (server, clients), besides A and B.
EXTRA_NS=()

del_ns() {
  local ns pid
  for ns in "$NS_A" "$NS_B" "${EXTRA_NS[@]}"; do
    ip netns list | grep -qw "^$ns" || continue
    # Anything still inside our namespaces was started by this script.
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  NS_UP=0
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  stop_pids
  del_ns
  if ((rc != 0)); then
    echo "dataplane.sh: failed (exit $rc); logs:" >&2
    for f in "$WORK"/*.log; do
      [[ -s $f ]] || continue
      echo "----- $(basename "$f")" >&2
      tail -n 15 "$f" >&2
    done
  fi
  if [[ ${KEEP:-0} == 1 ]]; then echo "dataplane.sh: kept $WORK" >&2; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ina() { ip netns exec "$NS_A" "$@"; }
inb() { ip netns exec "$NS_B" "$@"; }

# wait_for DESCRIPTION TRIES COMMAND...: polls COMMAND every 0.1 s, TRIES times.
wait_for() {
  local what=$1 tries=$2 i
  shift 2
  for i in $(seq "$tries"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "dataplane.sh: timed out waiting for $what" >&2
  return 1
}

setup_ns() {
  del_ns
  ip netns add "$NS_A"
  ip netns add "$NS_B"
  NS_UP=1
  ip -n "$NS_A" link add veth0 type veth peer name veth0 netns "$NS_B"
  ip -n "$NS_A" addr add "$UNDER_A/24" dev veth0
  ip -n "$NS_B" addr add "$UNDER_B/24" dev veth0
  for ns in "$NS_A" "$NS_B"; do
    ip -n "$ns" link set lo up
    ip -n "$ns" link set veth0 up
  done
}

# start SIDE NAME COMMAND...: runs COMMAND in SIDE's namespace in the
# background. `ip netns exec` execs the command, so $! is the process itself
# (its /proc/PID/stat counts the CPU of all its threads).
start() {
  local side=$1 name=$2 ns=$NS_A
  shift 2
  [[ $side == B ]] && ns=$NS_B
  ip netns exec "$ns" "$@" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
  eval "PID_$side=$!"
}

# Overlay addressing for the wg-style implementations: MTU, address, route, up.
net_up() {
  local ns=$1 ifname=$2 mine=$3 peer=$4
  ip -n "$ns" link set "$ifname" mtu "$MTU"
  ip -n "$ns" addr add "$mine/32" dev "$ifname"
  ip -n "$ns" link set "$ifname" up
  ip -n "$ns" route add "$peer/32" dev "$ifname"
}

KEY_A=$(wg genkey)
KEY_B=$(wg genkey)
PUB_A=$(wg pubkey <<<"$KEY_A")
PUB_B=$(wg pubkey <<<"$KEY_B")

# wg_conf SIDE [quick]: the `wg setconf` file; with "quick", the wg-quick
# file `ztmesh tunnel` reads (Address and MTU in [Interface] as well).
wg_conf() {
  local key=$KEY_A peer=$PUB_B mine=$OVER_A over=$OVER_B under=$UNDER_B
  if [[ $1 == B ]]; then key=$KEY_B peer=$PUB_A mine=$OVER_B over=$OVER_A under=$UNDER_A; fi
  printf '[Interface]\nPrivateKey = %s\nListenPort = %s\n' "$key" "$PORT"
  [[ ${2:-} == quick ]] && printf 'Address = %s/32\nMTU = %s\n' "$mine" "$MTU"
  printf '\n[Peer]\nPublicKey = %s\nAllowedIPs = %s/32\nEndpoint = %s:%s\n' "$peer" "$over" "$under" "$PORT"
}

# --- implementations: impl_NAME_start sets PID_A, PID_B, DST (B's overlay address) ---

impl_bare_start() { DST=$UNDER_B; PID_A=; PID_B=; }

impl_ztmesh_start() {
  local bin=${1:-$BIN}
  wg_conf A quick >"$WORK/wg-A.conf"
  wg_conf B quick >"$WORK/wg-B.conf"
  start A ztmesh-A "$bin/ztmesh" tunnel --config "$WORK/wg-A.conf" --interface "$IF_A" --no-uapi
  start B ztmesh-B "$bin/ztmesh" tunnel --config "$WORK/wg-B.conf" --interface "$IF_B" --no-uapi
  wait_for "ztmesh TUN A" 100 ip -n "$NS_A" link show "$IF_A"
  wait_for "ztmesh TUN B" 100 ip -n "$NS_B" link show "$IF_B"
  DST=$OVER_B
}

impl_agent_start() {
  local policy=$WORK/policy.hujson key side sock
  # A fresh controller and fresh node state for every repetition.
  rm -rf "$WORK/ctl" "$WORK/node-A" "$WORK/node-B"
  printf '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}\n' >"$policy"
  start A controller "$BIN/ztmesh-controller" serve --data-dir "$WORK/ctl" --listen "$UNDER_A:$CTL_PORT"
  PID_CTL=$PID_A
  wait_for "controller" 300 ina "$BIN/ztmesh-controller" --data-dir "$WORK/ctl" nodes list
  ina "$BIN/ztmesh-controller" --data-dir "$WORK/ctl" policy set "$policy" >/dev/null
  ina "$BIN/ztmesh-controller" --data-dir "$WORK/ctl" users create bench@example.com >/dev/null
  key=$(ina "$BIN/ztmesh-controller" --data-dir "$WORK/ctl" keys create --user bench@example.com --reusable)
  for side in A B; do
    sock=$WORK/node-$side/ztmesh.sock
    mkdir -p "$WORK/node-$side"
    local ifname=$IF_A; [[ $side == B ]] && ifname=$IF_B
    local metrics=()
    [[ ${AGENT_METRICS:-0} == 1 ]] && metrics=(--metrics-listen 127.0.0.1:9465)
    start "$side" "daemon-$side" "$BIN/ztmesh" daemon --state-dir "$WORK/node-$side/state" --socket "$sock" \
      --interface "$ifname" --mtu "$MTU" --port "$PORT" --uapi-dir "$WORK/node-$side/uapi" "${metrics[@]}"
    wait_for "daemon $side socket" 200 test -S "$sock"
    if [[ $side == A ]]; then
      ina timeout 60 "$BIN/ztmesh" up --socket "$sock" --controller "https://$UNDER_A:$CTL_PORT" \
        --auth-key "$key" --hostname bench-a >"$WORK/up-A.log" 2>&1
    else
      inb timeout 60 "$BIN/ztmesh" up --socket "$sock" --controller "https://$UNDER_A:$CTL_PORT" \
        --auth-key "$key" --hostname bench-b >"$WORK/up-B.log" 2>&1
    fi
  done
  DST=$(inb timeout 10 "$BIN/ztmesh" ip -4 --socket "$WORK/node-B/ztmesh.sock" | head -n1)
  [[ -n $DST ]] || { echo "dataplane.sh: no overlay address for B" >&2; return 1; }
  if [[ ${AGENT_METRICS:-0} == 1 ]]; then
    # A scraper per side, once a second, bounded (not PID_A/PID_B: the CPU
    # figure is the daemons' own, which includes rendering the metrics).
    local ns
    for ns in "$NS_A" "$NS_B"; do
      ip netns exec "$ns" bash -c 'for _ in $(seq 3600); do
          curl -s -o /dev/null --max-time 2 http://127.0.0.1:9465/metrics; sleep 1; done' \
        >/dev/null 2>&1 &
      PIDS+=($!)
    done
  fi
}

wg_uapi_start() { # NAME CMD... (CMD gets IFNAME appended)
  local name=$1
  shift
  start A "$name-A" "$@" "$IF_A"
  start B "$name-B" "$@" "$IF_B"
  wait_for "$name UAPI A" 100 test -S "/var/run/wireguard/$IF_A.sock"
  wait_for "$name UAPI B" 100 test -S "/var/run/wireguard/$IF_B.sock"
  wg_conf A >"$WORK/wg-A.conf"
  wg_conf B >"$WORK/wg-B.conf"
  ina wg setconf "$IF_A" "$WORK/wg-A.conf"
  inb wg setconf "$IF_B" "$WORK/wg-B.conf"
  net_up "$NS_A" "$IF_A" "$OVER_A" "$OVER_B"
  net_up "$NS_B" "$IF_B" "$OVER_B" "$OVER_A"
  DST=$OVER_B
}

# Agent mode and the standalone tunnel with the baseline binaries (BASE_BIN).
impl_agent0_start() { BIN=$BASE_BIN AGENT_METRICS=0 impl_agent_start; }
impl_ztmesh0_start() { impl_ztmesh_start "$BASE_BIN"; }

impl_wggo_start() { wg_uapi_start wggo env WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 wireguard-go -f; }
impl_bt_start() { wg_uapi_start bt "$BORINGTUN" -f --disable-drop-privileges; }
impl_bt1_start() { wg_uapi_start bt1 "$BORINGTUN" -f --disable-drop-privileges --threads 1; }

impl_label() {
  case $1 in
    bare) echo "bare veth" ;;
    ztmesh) echo "ztmesh tunnel (standalone)" ;;
    ztmesh0) echo "ztmesh tunnel (standalone, baseline \$BASE_BIN)" ;;
    agent) echo "ztmesh daemon (agent mode)" ;;
    agent0) echo "ztmesh daemon (agent mode, baseline \$BASE_BIN)" ;;
    wggo) echo "wireguard-go" ;;
    bt) echo "boringtun-cli (default threads)" ;;
    bt1) echo "boringtun-cli --threads 1" ;;
  esac
}

# --- measurements ---

proc_ticks() { # EXPR PID...: sum over the PIDs of an awk EXPR of /proc/PID/stat, in clock ticks
  local expr=$1 total=0 pid f
  shift
  for pid in "$@"; do
    [[ -n $pid && -r /proc/$pid/stat ]] || continue
    # Fields after the command name "(...)": utime and stime are fields 14 and 15.
    f=$(sed 's/^.*) //' "/proc/$pid/stat")
    total=$((total + $(awk "{print $expr}" <<<"$f")))
  done
  echo "$total"
}

cpu_ticks() { proc_ticks '$12 + $13' "$@"; } # utime+stime of all threads (0 if no PID)
sys_ticks() { proc_ticks '$13' "$@"; }       # stime: kernel time in the processes' context

host_busy_ticks() { # busy clock ticks of all CPUs (user nice system irq softirq steal)
  awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9; exit}' /proc/stat
}

steal_ticks() { # clock ticks the hypervisor took from this VM's CPUs
  awk '/^cpu / {print $9; exit}' /proc/stat
}

rss_kib() { # PID: VmRSS in KiB (0 if none)
  [[ -n ${1:-} && -r /proc/$1/status ]] || { echo 0; return; }
  awk '/^VmRSS:/ {print $2}' "/proc/$1/status"
}

iperf() { # ARGS...: one-shot server in B, client in A; prints the client's JSON
  local secs=$1
  shift
  inb timeout $((secs + 20)) iperf3 -s -1 -p "$IPERF_PORT" >"$WORK/iperf-server.log" 2>&1 &
  local srv=$! p keep=()
  PIDS+=("$srv")
  wait_for "iperf3 server" 50 bash -c "ip netns exec '$NS_B' ss -Hltn 'sport = :$IPERF_PORT' | grep -q ."
  ina timeout $((secs + 15)) iperf3 -c "$DST" -p "$IPERF_PORT" -t "$secs" -J "$@" || true
  wait "$srv" 2>/dev/null || true
  for p in "${PIDS[@]}"; do [[ $p == "$srv" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

run_impl() { # IMPL REP
  local impl=$1 rep=$2 json t0 t1 k0 k1 h0 h1 s0 s1 steal tcp1 tcp4 retr udp_pps ping_ms cpu sys host rss_a rss_idle
  setup_ns
  PID_A= PID_B= PID_CTL=
  "impl_${impl}_start"
  # First packet through (handshake): bounded.
  wait_for "$impl: first ping to $DST" 150 ina ping -c 1 -W 1 "$DST"
  ina ping -c 3 -i 0.2 -W 1 "$DST" >/dev/null 2>&1 || true
  rss_idle=$(rss_kib "$PID_A")

  t0=$(cpu_ticks "$PID_A" "$PID_B")
  k0=$(sys_ticks "$PID_A" "$PID_B")
  h0=$(host_busy_ticks)
  s0=$(steal_ticks)
  json=$(iperf "$TCP_SECS")
  s1=$(steal_ticks)
  h1=$(host_busy_ticks)
  t1=$(cpu_ticks "$PID_A" "$PID_B")
  k1=$(sys_ticks "$PID_A" "$PID_B")
  tcp1=$(jq -r '(.end.sum_received.bits_per_second // 0) / 1e9' <<<"$json" 2>/dev/null || echo 0)
  retr=$(jq -r '.end.sum_sent.retransmits // 0' <<<"$json" 2>/dev/null || echo 0)
  cpu=$(awk -v a="$t0" -v b="$t1" -v hz="$CLK_TCK" 'BEGIN {printf "%.2f", (b - a) / hz}')
  sys=$(awk -v a="$k0" -v b="$k1" -v hz="$CLK_TCK" 'BEGIN {printf "%.2f", (b - a) / hz}')
  host=$(awk -v a="$h0" -v b="$h1" -v hz="$CLK_TCK" 'BEGIN {printf "%.2f", (b - a) / hz}')
  steal=$(awk -v a="$s0" -v b="$s1" -v hz="$CLK_TCK" 'BEGIN {printf "%.2f", (b - a) / hz}')

  tcp4=0 udp_pps=0 ping_ms=0
  if [[ $TCP_ONLY != 1 ]]; then
    json=$(iperf "$TCP_SECS" -P 4)
    tcp4=$(jq -r '(.end.sum_received.bits_per_second // 0) / 1e9' <<<"$json" 2>/dev/null || echo 0)

    json=$(iperf "$UDP_SECS" -u -l 64 -b 0)
    udp_pps=$(jq -r '((.end.sum.packets // 0) - (.end.sum.lost_packets // 0)) / (.end.sum.seconds // 1)' <<<"$json" 2>/dev/null || echo 0)

    sleep 1 # let queues drain: ping measures an idle tunnel
    ping_ms=$(ina timeout $((PINGS + 10)) ping -c "$PINGS" -i 0.2 -W 1 "$DST" 2>/dev/null |
      sed -n 's/.*time=\([0-9.]*\).*/\1/p' | sort -g | awk '{v[NR]=$1} END {if (NR==0) print 0; else if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}')
  fi
  rss_a=$(rss_kib "$PID_A")
  printf '%s,%s,%.3f,%.3f,%.0f,%.3f,%s,%s,%s,%s,%s,%s\n' "$impl" "$rep" "$tcp1" "$tcp4" "$udp_pps" "$ping_ms" "$cpu" "$retr" "$rss_idle" "$rss_a" "$host" "$sys" >>"$SAMPLES"
  log "$(printf '%-8s rep %s: tcp1 %.2f Gbit/s (retr %s), tcp4 %.2f, udp %.0f pkt/s, ping %.3f ms, cpu %s s (kernel %s s; host %s s, of it stolen by the hypervisor %s s), rss A %s KiB idle, %s KiB after' \
    "$impl" "$rep" "$tcp1" "$retr" "$tcp4" "$udp_pps" "$ping_ms" "$cpu" "$sys" "$host" "$steal" "$rss_idle" "$rss_a")"
  stop_pids
  del_ns
}

# mem_rss N: VmRSS (KiB) of an idle `ztmesh tunnel` configured with N peers
# (random public keys, AllowedIPs 100.65.x.y/32, no endpoints), once all N
# are applied (`wg show` lists them) and a timer pass has run.
mem_rss() { # N [BIN]
  local n=$1 bin=${2:-$BIN} conf=$WORK/mem-$1.conf ifname="${TAG}m" rss tries
  setup_ns
  python3 - "$n" "$KEY_A" "$OVER_A" "$MTU" >"$conf" <<'PY'
import base64, os, sys
n, key, addr, mtu = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
print(f"[Interface]\nPrivateKey = {key}\nListenPort = 51821\nAddress = {addr}/32\nMTU = {mtu}\n")
for i in range(1, n + 1):
    pub = base64.b64encode(os.urandom(32)).decode()
    print(f"[Peer]\nPublicKey = {pub}\nAllowedIPs = 100.65.{i >> 8}.{i & 255}/32\n")
PY
  start A "mem-$n" "$bin/ztmesh" tunnel --config "$conf" --interface "$ifname"
  # Routes are added one `ip route` call per prefix: allow 10 ms each.
  tries=$((300 + n / 10))
  wait_for "$n peers applied" "$tries" bash -c "[[ \$(ip netns exec '$NS_A' wg show '$ifname' peers | wc -l) -eq $n ]]"
  sleep 1
  rss=$(rss_kib "$PID_A")
  stop_pids
  del_ns
  echo "$rss"
}

# many_run N REP: the many-peers test. Server namespace S holds bridge br0
# (198.18.1.1/24) and `ztmesh tunnel` 100.64.1.1 with N peers; client i has
# veth 198.18.1.(10+i) on the bridge and a tunnel 100.64.1.(10+i) with the
# server as its one peer. Every client sends one iperf3 TCP stream to the
# server at once, for TCP_SECS. Appends "N,REP,Gbit/s received in all,server
# tunnel CPU s" to $MANY_SAMPLES.
many_run() {
  local n=$1 rep=$2 ns_s="$TAG-s" i ns key pub conf t0 t1 total pids=() ports
  local skey spub
  EXTRA_NS=("$ns_s")
  for i in $(seq "$n"); do EXTRA_NS+=("$TAG-c$i"); done
  del_ns
  ip netns add "$ns_s"
  ip -n "$ns_s" link set lo up
  ip -n "$ns_s" link add br0 type bridge
  ip -n "$ns_s" addr add 198.18.1.1/24 dev br0
  ip -n "$ns_s" link set br0 up
  skey=$(wg genkey)
  spub=$(wg pubkey <<<"$skey")
  conf=$WORK/many-s.conf
  printf '[Interface]\nPrivateKey = %s\nListenPort = %s\nAddress = 100.64.1.1/32\nMTU = %s\n' "$skey" "$PORT" "$MTU" >"$conf"
  for i in $(seq "$n"); do
    ns="$TAG-c$i"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$ns_s" link add "vc$i" type veth peer name veth0 netns "$ns"
    ip -n "$ns_s" link set "vc$i" master br0 up
    ip -n "$ns" addr add "198.18.1.$((10 + i))/24" dev veth0
    ip -n "$ns" link set veth0 up
    key=$(wg genkey)
    pub=$(wg pubkey <<<"$key")
    printf '\n[Peer]\nPublicKey = %s\nAllowedIPs = 100.64.1.%s/32\nEndpoint = 198.18.1.%s:%s\n' "$pub" "$((10 + i))" "$((10 + i))" "$PORT" >>"$conf"
    printf '[Interface]\nPrivateKey = %s\nListenPort = %s\nAddress = 100.64.1.%s/32\nMTU = %s\n\n[Peer]\nPublicKey = %s\nAllowedIPs = 100.64.1.1/32\nEndpoint = 198.18.1.1:%s\n' \
      "$key" "$PORT" "$((10 + i))" "$MTU" "$spub" "$PORT" >"$WORK/many-c$i.conf"
  done
  ip netns exec "$ns_s" "$BIN/ztmesh" tunnel --config "$conf" --interface "${TAG}s" --no-uapi >"$WORK/many-s.log" 2>&1 &
  PIDS+=($!)
  local pid_s=$!
  for i in $(seq "$n"); do
    ip netns exec "$TAG-c$i" "$BIN/ztmesh" tunnel --config "$WORK/many-c$i.conf" --interface "${TAG}c$i" --no-uapi >"$WORK/many-c$i.log" 2>&1 &
    PIDS+=($!)
  done
  for i in $(seq "$n"); do
    wait_for "client $i to reach the server" 150 ip netns exec "$TAG-c$i" ping -c 1 -W 1 100.64.1.1
    ip netns exec "$TAG-s" timeout $((TCP_SECS + 30)) iperf3 -s -1 -p $((IPERF_PORT + i)) >"$WORK/many-iperf-s$i.log" 2>&1 &
    PIDS+=($!)
  done
  ports="$(seq -s '|' $((IPERF_PORT + 1)) $((IPERF_PORT + n)))"
  wait_for "$n iperf3 servers" 50 bash -c "[[ \$(ip netns exec '$ns_s' ss -Hltn | grep -cE ':($ports)\\b') -ge $n ]]"
  t0=$(cpu_ticks "$pid_s")
  for i in $(seq "$n"); do
    ip netns exec "$TAG-c$i" timeout $((TCP_SECS + 15)) iperf3 -c 100.64.1.1 -p $((IPERF_PORT + i)) -t "$TCP_SECS" -J >"$WORK/many-c$i.json" 2>/dev/null &
    pids+=($!)
  done
  wait "${pids[@]}" 2>/dev/null || true
  t1=$(cpu_ticks "$pid_s")
  total=0
  for i in $(seq "$n"); do
    total=$(awk -v t="$total" -v g="$(jq -r '(.end.sum_received.bits_per_second // 0) / 1e9' "$WORK/many-c$i.json" 2>/dev/null || echo 0)" 'BEGIN {print t + g}')
  done
  local cpu
  cpu=$(awk -v a="$t0" -v b="$t1" -v hz="$CLK_TCK" 'BEGIN {printf "%.2f", (b - a) / hz}')
  echo "$n,$rep,$total,$cpu" >>"$MANY_SAMPLES"
  log "$(printf 'many: %s client(s) rep %s: %.2f Gbit/s in all, server tunnel cpu %s s' "$n" "$rep" "$total" "$cpu")"
  stop_pids
  del_ns
  EXTRA_NS=()
}

# --- main ---

for impl in $IMPLS; do
  case $impl in
    ztmesh | agent) [[ -x $BIN/ztmesh && -x $BIN/ztmesh-controller ]] || {
      echo "dataplane.sh: $BIN/ztmesh missing; run: cargo build --release -p ztmesh-node -p ztmesh-controller" >&2
      exit 1
    } ;;
    agent0 | ztmesh0) [[ -n ${BASE_BIN:-} && -x $BASE_BIN/ztmesh && -x $BASE_BIN/ztmesh-controller ]] || {
      echo "dataplane.sh: $impl needs BASE_BIN=DIR holding a baseline ztmesh and ztmesh-controller" >&2
      exit 1
    } ;;
    wggo) command -v wireguard-go >/dev/null || { echo "dataplane.sh: wireguard-go missing (apt-get install wireguard-go)" >&2; exit 1; } ;;
    bt | bt1) [[ -x $BORINGTUN ]] || {
      echo "dataplane.sh: $BORINGTUN missing; run: cargo install boringtun-cli --locked --root target/bench-tools" >&2
      exit 1
    } ;;
    bare) ;;
    *) echo "dataplane.sh: unknown implementation $impl" >&2; exit 1 ;;
  esac
done

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
log "kernel $(uname -r), $(nproc) CPUs, load $LOAD_BEFORE; REPS=$REPS; impls: $IMPLS"
for rep in $(seq "$REPS"); do
  for impl in $IMPLS; do
    run_impl "$impl" "$rep"
  done
done
MANY_SAMPLES=$WORK/many.csv
: >"$MANY_SAMPLES"
if ((MANY >= 2)); then
  [[ -x $BIN/ztmesh ]] || { echo "dataplane.sh: MANY needs $BIN/ztmesh" >&2; exit 1; }
  for rep in $(seq "$REPS"); do
    many_run 1 "$rep"
    many_run "$MANY" "$rep"
  done
fi
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
[[ -n ${OUT:-} ]] && cp "$SAMPLES" "$OUT"

# Statistics both tables use: vals[KEY] holds space-separated samples.
STATS_AWK='
  function sorted(key, a,   n, i, j, t) {
    n = split(vals[key], a, " ")
    for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j-1] + 0 > a[j] + 0; j--) { t = a[j]; a[j] = a[j-1]; a[j-1] = t }
    return n
  }
  function median(key,   n, a) {
    n = sorted(key, a)
    if (n == 0) return 0
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
  function range(key, fmt,   n, a) {
    n = sorted(key, a)
    return (n == 0) ? "-" : sprintf(fmt "–" fmt, a[1], a[n])
  }
  function add(key, v) { vals[key] = vals[key] (vals[key] == "" ? "" : " ") v }
'

# --- table: medians per implementation, ratios against wireguard-go ---
if [[ -s $SAMPLES ]]; then
echo
echo "Data plane, $(uname -r), $(nproc) vCPU, MTU $MTU, REPS=$REPS (medians, min–max), load before/after: $LOAD_BEFORE / $LOAD_AFTER"
awk -F, -v order="$IMPLS" -v secs="$TCP_SECS" "$STATS_AWK"'
  function ratio(x, base) { return (base > 0 && x > 0) ? sprintf("%.2fx", x / base) : "-" }
  {
    for (c = 3; c <= 11; c++) add($1 SUBSEP c, $c)
    # Cost per byte of this sample: cores (CPU s per s) per Gbit/s.
    if ($3 > 0) { add($1 SUBSEP "tun", $7 / secs / $3); add($1 SUBSEP "host", $11 / secs / $3); add($1 SUBSEP "sys", $12 / secs / $3) }
  }
  END {
    label["bare"] = "bare veth"; label["ztmesh"] = "ztmesh tunnel"; label["agent"] = "ztmesh daemon (agent)"
    label["agent0"] = "ztmesh daemon (baseline)"; label["ztmesh0"] = "ztmesh tunnel (baseline)"
    label["wggo"] = "wireguard-go"; label["bt"] = "boringtun-cli (default)"; label["bt1"] = "boringtun-cli -t 1"
    n = split(order, impls, " ")
    for (c = 3; c <= 10; c++) base[c] = median("wggo" SUBSEP c)
    printf "| %-24s | %-22s | %-13s | %-15s | %-24s | %-22s | %-9s | %-10s | %-7s | %-16s |\n", "implementation", "TCP 1 Gbit/s", "TCP 4 Gbit/s", "UDP 64 B kpkt/s", "ping RTT ms", "tunnel cores per Gbit/s", "of it kernel", "host c/Gb", "retrans", "RSS A MiB idle/after"
    print "|---|---|---|---|---|---|---|---|---|---|"
    for (i = 1; i <= n; i++) {
      k = impls[i]
      if (vals[k SUBSEP 3] == "") continue
      t1 = median(k SUBSEP 3); t4 = median(k SUBSEP 4); u = median(k SUBSEP 5); p = median(k SUBSEP 6)
      re = median(k SUBSEP 8); idle = median(k SUBSEP 9); rss = median(k SUBSEP 10)
      tun = (k == "bare") ? "-" : sprintf("%.3f (%s)", median(k SUBSEP "tun"), range(k SUBSEP "tun", "%.3f"))
      kern = (k == "bare") ? "-" : sprintf("%.3f", median(k SUBSEP "sys"))
      printf "| %-24s | %5.2f (%s) %6s | %5.2f (%6s) | %6.1f (%6s) | %5.3f (%s) %6s | %-22s | %9s | %10.3f | %7d | %16s |\n", label[k], \
        t1, range(k SUBSEP 3, "%.2f"), ratio(t1, base[3]), t4, ratio(t4, base[4]), u / 1000, ratio(u, base[5]), \
        p, range(k SUBSEP 6, "%.3f"), ratio(p, base[6]), tun, kern, median(k SUBSEP "host"), re, \
        (k == "bare" ? "-" : sprintf("%.1f / %.1f", idle / 1024, rss / 1024))
    }
    print ""
    print "Ratios are against wireguard-go (higher is better except for ping RTT). Medians, with min–max in parentheses."
    print "Tunnel cores per Gbit/s: utime+stime of both tunnel processes (agent: both daemons) during the 1-stream"
    print "TCP test, per second and per Gbit/s received; of it kernel: their stime alone (system calls, copies, the"
    print "network stack run in their context); the rest is user space (for ztmesh mostly the AEAD: see"
    print "node/benches/packet_path.rs). Host c/Gb: the whole host busy CPU over the same test, per Gbit/s."
    print "RSS A: VmRSS of the tunnel process in namespace A (sender), idle after the handshake / after all tests."
  }' "$SAMPLES"
fi

# mem_report LABEL BIN: RSS with 1 and MEM_PEERS peers, and the cost per extra peer.
mem_report() {
  local label=$1 bin=$2 one many
  log "memory: $label with 1 and $MEM_PEERS peers"
  one=$(mem_rss 1 "$bin")
  many=$(mem_rss "$MEM_PEERS" "$bin")
  awk -v label="$label" -v one="$one" -v many="$many" -v n="$MEM_PEERS" 'BEGIN {
    printf "Memory (%s, idle, VmRSS): 1 peer %.1f MiB; %d peers %.1f MiB; %.2f KiB per extra peer\n", \
      label, one / 1024, n, many / 1024, (many - one) / (n - 1)
  }'
}

if ((MEM_PEERS > 0)) && command -v python3 >/dev/null; then
  [[ " $IMPLS " == *" ztmesh "* ]] && { echo; mem_report "ztmesh tunnel" "$BIN"; }
  [[ " $IMPLS " == *" ztmesh0 "* ]] && mem_report "ztmesh tunnel, baseline" "$BASE_BIN"
fi

if [[ -s $MANY_SAMPLES ]]; then
  echo
  echo "Many peers (ztmesh tunnel): 1 and $MANY clients, one TCP stream each to one server, $TCP_SECS s, REPS=$REPS (medians, min–max)"
  awk -F, -v secs="$TCP_SECS" -v many="$MANY" "$STATS_AWK"'
    { add($1 SUBSEP "g", $3); add($1 SUBSEP "cpu", $4); if ($3 > 0) add($1 SUBSEP "c", $4 / secs / $3) }
    END {
      print "| clients | Gbit/s in all | server tunnel cores | server cores per Gbit/s |"
      print "|---|---|---|---|"
      split("1 " many, ns, " ")
      for (i = 1; i <= 2; i++) {
        k = ns[i]
        printf "| %d | %.2f (%s) | %.2f | %.3f (%s) |\n", k, median(k SUBSEP "g"), range(k SUBSEP "g", "%.2f"), \
          median(k SUBSEP "cpu") / secs, median(k SUBSEP "c"), range(k SUBSEP "c", "%.3f")
      }
      one = median(1 SUBSEP "c"); m = median(many SUBSEP "c")
      if (one > 0) printf "\nServer cores per Gbit/s with %d clients / with 1: %.2fx (target: at most 1.2x)\n", many, m / one
    }' "$MANY_SAMPLES"
fi
