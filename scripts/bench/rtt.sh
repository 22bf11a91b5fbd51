#!/usr/bin/env bash
# Idle-tunnel RTT of one or more ztmesh builds, alternating, in one run:
# two namespaces on a veth (198.18.0.1/24 <-> 198.18.0.2/24), one
# `ztmesh tunnel` each (100.64.0.1 <-> 100.64.0.2, MTU 1420), N pings
# INTERVAL apart through the tunnel; prints median, mean, p10 and p90 per
# build per round, and the CPU time the answering side's tunnel used per
# echo (perf stat task-clock; user and kernel time in its context, so the
# cost of a wake-up is in it), and the same for the pinging side's tunnel.
# For changes whose effect on latency is smaller than the spread of
# dataplane.sh's 20 pings.
#
#   sudo scripts/bench/rtt.sh DIR... [boringtun]
#     DIR: a directory with a `ztmesh` binary; `boringtun`: boringtun-cli
#     --threads 1 from $BORINGTUN (default target/bench-tools/bin), the peer
#     the issue compares against
#
# Environment: ROUNDS=3, N=100, INTERVAL=0.05 (bounded: ROUNDS x N pings).
set -euo pipefail
(($# > 0)) || { echo "usage: rtt.sh DIR..." >&2; exit 2; }
[[ $EUID -eq 0 ]] || { echo "rtt.sh: needs root" >&2; exit 1; }
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BORINGTUN=${BORINGTUN:-$ROOT/target/bench-tools/bin/boringtun-cli}
ROUNDS=${ROUNDS:-3}
N=${N:-100}
INTERVAL=${INTERVAL:-0.05}
TAG="zr$$"
A="$TAG-a"
B="$TAG-b"
WORK=$(mktemp -d /tmp/ztmrtt.XXXXXX)
PIDS=()

cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  set +e
  ((${#PIDS[@]})) && kill "${PIDS[@]}" 2>/dev/null && wait "${PIDS[@]}" 2>/dev/null
  for ns in "$A" "$B"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
  done
  rm -rf "$WORK"
  rm -f "/var/run/wireguard/${TAG}a.sock" "/var/run/wireguard/${TAG}b.sock"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

KA=$(wg genkey)
KB=$(wg genkey)
conf() { # KEY MINE PEERKEY PEER UNDER
  printf '[Interface]\nPrivateKey = %s\nListenPort = 51820\nAddress = %s/32\nMTU = 1420\n\n[Peer]\nPublicKey = %s\nAllowedIPs = %s/32\nEndpoint = %s:51820\n' \
    "$1" "$2" "$(wg pubkey <<<"$3")" "$4" "$5"
}
conf "$KA" 100.64.0.1 "$KB" 100.64.0.2 198.18.0.2 >"$WORK/a.conf"
conf "$KB" 100.64.0.2 "$KA" 100.64.0.1 198.18.0.1 >"$WORK/b.conf"
# The same keys for `wg setconf` (no Address/MTU lines).
grep -v -e '^Address' -e '^MTU' "$WORK/a.conf" >"$WORK/a.wg"
grep -v -e '^Address' -e '^MTU' "$WORK/b.conf" >"$WORK/b.wg"

start() { # IMPL NS SIDE MINE PEER: one tunnel; its PID in $STARTED
  local impl=$1 ns=$2 side=$3 mine=$4 peer=$5 i
  if [[ $impl == boringtun ]]; then
    ip netns exec "$ns" "$BORINGTUN" -f --disable-drop-privileges --threads 1 "${TAG}$side" >"$WORK/$side.log" 2>&1 &
    STARTED=$!
    for i in $(seq 50); do [[ -S /var/run/wireguard/${TAG}$side.sock ]] && break; sleep 0.1; done
    ip netns exec "$ns" wg setconf "${TAG}$side" "$WORK/$side.wg"
    ip -n "$ns" addr add "$mine/32" dev "${TAG}$side"
    ip -n "$ns" link set "${TAG}$side" mtu 1420 up
    ip -n "$ns" route add "$peer/32" dev "${TAG}$side"
  else
    ip netns exec "$ns" "$impl/ztmesh" tunnel --config "$WORK/$side.conf" --interface "${TAG}$side" --no-uapi >"$WORK/$side.log" 2>&1 &
    STARTED=$!
  fi
}

one() { # DIR: prints the statistics of N pings through a fresh pair of tunnels
  local dir=$1 i
  ip netns add "$A"
  ip netns add "$B"
  ip -n "$A" link add veth0 type veth peer name veth0 netns "$B"
  ip -n "$A" addr add 198.18.0.1/24 dev veth0
  ip -n "$B" addr add 198.18.0.2/24 dev veth0
  for ns in "$A" "$B"; do ip -n "$ns" link set lo up; ip -n "$ns" link set veth0 up; done
  start "$dir" "$A" a 100.64.0.1 100.64.0.2
  PIDS+=("$STARTED")
  local pid_a=$STARTED
  start "$dir" "$B" b 100.64.0.2 100.64.0.1
  PIDS+=("$STARTED")
  local pid_b=$STARTED stat_a="" stat_b=""
  for i in $(seq 100); do
    ip netns exec "$A" ping -c 1 -W 1 100.64.0.2 >/dev/null 2>&1 && break
    sleep 0.1
  done
  if command -v perf >/dev/null; then
    perf stat -e task-clock -x, -o "$WORK/stat-a" -p "$pid_a" 2>/dev/null &
    stat_a=$!
    perf stat -e task-clock -x, -o "$WORK/stat-b" -p "$pid_b" 2>/dev/null &
    stat_b=$!
    sleep 0.2
  fi
  ip netns exec "$A" timeout $((N + 30)) ping -c "$N" -i "$INTERVAL" 100.64.0.2 |
    sed -n 's/.*time=\([0-9.]*\).*/\1/p' | sort -g |
    awk '{v[NR] = $1; s += $1} END {if (NR == 0) {printf "no replies"; exit}
      printf "median %.3f mean %.3f p10 %.3f p90 %.3f ms (%d replies)", v[int(NR / 2) + 1], s / NR, v[int(NR * 0.1) + 1], v[int(NR * 0.9)], NR}'
  if [[ -n $stat_b ]]; then
    kill -INT "$stat_a" "$stat_b" 2>/dev/null
    wait "$stat_a" "$stat_b" 2>/dev/null || true
    # task-clock in ms, over N echoes (the 0.2 s before the pings adds only timer ticks)
    awk -F, -v n="$N" '$3 ~ /task-clock/ {printf ", CPU per echo: B tunnel %.1f us", $1 * 1000 / n}' "$WORK/stat-b"
    awk -F, -v n="$N" '$3 ~ /task-clock/ {printf ", A tunnel %.1f us", $1 * 1000 / n}' "$WORK/stat-a"
  fi
  echo
  kill "${PIDS[@]}" 2>/dev/null
  wait "${PIDS[@]}" 2>/dev/null || true
  PIDS=()
  ip netns del "$A"
  ip netns del "$B"
}

for round in $(seq "$ROUNDS"); do
  for dir in "$@"; do
    printf 'round %s  %-40s ' "$round" "$dir"
    one "$dir"
  done
done
