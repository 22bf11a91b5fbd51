#!/usr/bin/env bash
# Data-plane profile (issue 21): where the tunnel's cycles go, as flame
# graphs, plus the counters that explain cost per byte and wake-ups.
#
#   namespace A (sender)                      namespace B (receiver)
#   veth 198.18.0.1/24  <------------------>  veth 198.18.0.2/24
#   ztmesh tunnel 100.64.0.1/32 (MTU 1420)    ztmesh tunnel 100.64.0.2/32
#   iperf3 -c (1 TCP stream) / ping           iperf3 -s
#
# Runs one single-stream TCP test (TCP_SECS) and records, on each tunnel
# process, `perf record` with DWARF call graphs (FREQ Hz, the middle
# PERF_SECS of the test) and `perf stat` (task clock, context switches,
# syscalls). Then an idle ping (PINGS at 0.2 s) with `perf stat` again: the
# wake-ups and syscalls each echo costs. Writes to OUT_DIR (default
# docs/perf): tcp-sender.svg, tcp-receiver.svg (flame graphs), the folded
# stacks (*.folded, to diff runs), and summary.txt (throughput, CPU seconds,
# cores per Gbit/s, counters per packet, the top functions by self time).
#
# Needs root, perf, iperf3, ping, wg (wireguard-tools, for keys), a release
# build of ztmesh (BIN=target/release) and inferno (`cargo install inferno
# --root target/bench-tools`; INFERNO=DIR/bin).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

BIN=${BIN:-$ROOT/target/release}
INFERNO=${INFERNO:-$ROOT/target/bench-tools/bin}
OUT_DIR=${OUT_DIR:-$ROOT/docs/perf}
TCP_SECS=${TCP_SECS:-12}
PERF_SECS=${PERF_SECS:-6}
FREQ=${FREQ:-499}
PINGS=${PINGS:-50}
MTU=1420
PORT=51820

if [[ $EUID -ne 0 ]]; then
  echo "profile.sh: needs root (network namespaces, TUN devices, perf)" >&2
  exit 1
fi
for tool in perf iperf3 ping wg ip timeout jq "$INFERNO/inferno-collapse-perf" "$INFERNO/inferno-flamegraph" "$BIN/ztmesh"; do
  command -v "$tool" >/dev/null || { echo "profile.sh: $tool not found" >&2; exit 1; }
done

TAG="zp$$"
NS_A="$TAG-a"
NS_B="$TAG-b"
IF_A="${TAG}a"
IF_B="${TAG}b"
UNDER_A=198.18.0.1
UNDER_B=198.18.0.2
OVER_A=100.64.0.1
OVER_B=100.64.0.2
WORK=$(mktemp -d /tmp/ztmprof.XXXXXX)
PIDS=()

cleanup() {
  local rc=$? pid ns
  trap - EXIT INT TERM
  set +e
  ((${#PIDS[@]})) && kill -TERM "${PIDS[@]}" 2>/dev/null
  sleep 0.5
  ((${#PIDS[@]})) && kill -KILL "${PIDS[@]}" 2>/dev/null
  for ns in "$NS_A" "$NS_B"; do
    ip netns list | grep -qw "^$ns" || continue
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
  done
  if ((rc != 0)); then
    for f in "$WORK"/*.log; do [[ -s $f ]] && { echo "----- $f" >&2; tail -n 10 "$f" >&2; }; done
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ip netns add "$NS_A"
ip netns add "$NS_B"
ip -n "$NS_A" link add veth0 type veth peer name veth0 netns "$NS_B"
ip -n "$NS_A" addr add "$UNDER_A/24" dev veth0
ip -n "$NS_B" addr add "$UNDER_B/24" dev veth0
for ns in "$NS_A" "$NS_B"; do
  ip -n "$ns" link set lo up
  ip -n "$ns" link set veth0 up
done

KEY_A=$(wg genkey)
KEY_B=$(wg genkey)
conf() { # SIDE: the wg-quick file `ztmesh tunnel` reads
  local key=$KEY_A peer=$(wg pubkey <<<"$KEY_B") mine=$OVER_A over=$OVER_B under=$UNDER_B
  if [[ $1 == B ]]; then key=$KEY_B peer=$(wg pubkey <<<"$KEY_A") mine=$OVER_B over=$OVER_A under=$UNDER_A; fi
  printf '[Interface]\nPrivateKey = %s\nListenPort = %s\nAddress = %s/32\nMTU = %s\n\n' "$key" "$PORT" "$mine" "$MTU"
  printf '[Peer]\nPublicKey = %s\nAllowedIPs = %s/32\nEndpoint = %s:%s\n' "$peer" "$over" "$under" "$PORT"
}
conf A >"$WORK/A.conf"
conf B >"$WORK/B.conf"
ip netns exec "$NS_A" "$BIN/ztmesh" tunnel --config "$WORK/A.conf" --interface "$IF_A" --no-uapi >"$WORK/A.log" 2>&1 &
PID_A=$!
PIDS+=("$PID_A")
ip netns exec "$NS_B" "$BIN/ztmesh" tunnel --config "$WORK/B.conf" --interface "$IF_B" --no-uapi >"$WORK/B.log" 2>&1 &
PID_B=$!
PIDS+=("$PID_B")
for i in $(seq 100); do
  ip -n "$NS_B" link show "$IF_B" >/dev/null 2>&1 && ip -n "$NS_A" link show "$IF_A" >/dev/null 2>&1 && break
  sleep 0.1
done
timeout 10 ip netns exec "$NS_A" ping -c 3 -i 0.2 -W 2 "$OVER_B" >/dev/null

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
CLK_TCK=$(getconf CLK_TCK)
EVENTS=task-clock,context-switches,cpu-migrations
# (Not `| grep -q`: under pipefail perf's SIGPIPE would fail the test.)
[[ $(perf list 2>/dev/null) == *raw_syscalls:sys_enter* ]] && EVENTS+=,raw_syscalls:sys_enter

# --- single-stream TCP, profiled in the middle -------------------------------
ip netns exec "$NS_B" iperf3 -s -1 -p 5201 >"$WORK/iperf-s.log" 2>&1 &
PIDS+=($!)
sleep 0.5
ip netns exec "$NS_A" timeout $((TCP_SECS + 10)) iperf3 -c "$OVER_B" -p 5201 -t "$TCP_SECS" -J >"$WORK/iperf.json" 2>"$WORK/iperf-c.log" &
IPERF=$!
sleep $(((TCP_SECS - PERF_SECS) / 2))
a0=$(cpu_ticks "$PID_A")
b0=$(cpu_ticks "$PID_B")
perf record -F "$FREQ" --call-graph dwarf,16384 -p "$PID_A" -o "$WORK/A.data" -- sleep "$PERF_SECS" >"$WORK/rec-A.log" 2>&1 &
RA=$!
perf record -F "$FREQ" --call-graph dwarf,16384 -p "$PID_B" -o "$WORK/B.data" -- sleep "$PERF_SECS" >"$WORK/rec-B.log" 2>&1 &
RB=$!
perf stat -x, -e "$EVENTS" -p "$PID_A" -o "$WORK/stat-A.csv" -- sleep "$PERF_SECS" >/dev/null 2>&1 &
SA=$!
perf stat -x, -e "$EVENTS" -p "$PID_B" -o "$WORK/stat-B.csv" -- sleep "$PERF_SECS" >/dev/null 2>&1 &
SB=$!
wait "$RA" "$RB" "$SA" "$SB"
a1=$(cpu_ticks "$PID_A")
b1=$(cpu_ticks "$PID_B")
wait "$IPERF"
gbps=$(jq -r '.end.sum_received.bits_per_second / 1e9' "$WORK/iperf.json")

# --- idle ping: what one echo costs ---------------------------------------
perf stat -x, -e "$EVENTS" -p "$PID_A" -o "$WORK/ping-A.csv" -- sleep $((PINGS / 5 + 1)) >/dev/null 2>&1 &
PA=$!
perf stat -x, -e "$EVENTS" -p "$PID_B" -o "$WORK/ping-B.csv" -- sleep $((PINGS / 5 + 1)) >/dev/null 2>&1 &
PB=$!
ip netns exec "$NS_A" ping -c "$PINGS" -i 0.2 -W 2 "$OVER_B" >"$WORK/ping.log"
wait "$PA" "$PB"
rtt=$(awk -F'/' '/^rtt/ {print $5}' "$WORK/ping.log")

mkdir -p "$OUT_DIR"
for side in A B; do
  name=tcp-sender
  [[ $side == B ]] && name=tcp-receiver
  perf script -i "$WORK/$side.data" 2>/dev/null | "$INFERNO/inferno-collapse-perf" >"$OUT_DIR/$name.folded"
  "$INFERNO/inferno-flamegraph" --title "ztmesh tunnel, 1 TCP stream, $name ($(date -u +%F))" \
    <"$OUT_DIR/$name.folded" >"$OUT_DIR/$name.svg"
  perf report -i "$WORK/$side.data" --no-children -g none --stdio --percent-limit 1 \
    --sort symbol 2>/dev/null | grep -E '^ +[0-9]' | sed 's/ *$//' | head -25 >"$WORK/top-$side.txt" || true
done

stat_val() { # FILE EVENT: the counter's value
  awk -F, -v e="$2" '$3 == e || index($3, e) == 1 {print $1; exit}' "$1"
}
{
  echo "ztmesh tunnel profile, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "machine: $(nproc) cores, $(uname -r); load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "command: scripts/bench/profile.sh (TCP_SECS=$TCP_SECS PERF_SECS=$PERF_SECS FREQ=$FREQ PINGS=$PINGS)"
  echo
  printf 'single-stream TCP: %.2f Gbit/s\n' "$gbps"
  cpu_a=$(echo "scale=3; ($a1 - $a0) / $CLK_TCK" | bc)
  cpu_b=$(echo "scale=3; ($b1 - $b0) / $CLK_TCK" | bc)
  echo "tunnel CPU over the ${PERF_SECS} s window: sender ${cpu_a} s, receiver ${cpu_b} s"
  echo "cores per Gbit/s (both sides): $(echo "scale=3; ($cpu_a + $cpu_b) / $PERF_SECS / $gbps" | bc)"
  pkts=$(echo "scale=0; $gbps * 1000000000 * $PERF_SECS / 8 / $MTU" | bc)
  for side in A B; do
    f=$WORK/stat-$side.csv
    cs=$(stat_val "$f" context-switches)
    sc=$(stat_val "$f" raw_syscalls:sys_enter)
    echo "$side: context switches ${cs:-?} ($(echo "scale=3; ${cs:-0} / $pkts" | bc) per ${MTU}-byte packet), syscalls ${sc:-?} ($(echo "scale=3; ${sc:-0} / $pkts" | bc) per packet)"
  done
  echo
  echo "idle ping: average RTT ${rtt} ms over $PINGS echoes"
  for side in A B; do
    f=$WORK/ping-$side.csv
    cs=$(stat_val "$f" context-switches)
    sc=$(stat_val "$f" raw_syscalls:sys_enter)
    echo "$side: per echo $(echo "scale=2; ${cs:-0} / $PINGS" | bc) context switches, $(echo "scale=2; ${sc:-0} / $PINGS" | bc) syscalls"
  done
  for side in A B; do
    echo
    [[ $side == A ]] && echo "sender: top functions by self time" || echo "receiver: top functions by self time"
    cat "$WORK/top-$side.txt"
  done
} | tee "$OUT_DIR/summary.txt"
