#!/usr/bin/env bash
# Idle-tunnel RTT of one or more ztmesh builds, alternating, in one run:
# two namespaces on a veth (198.18.0.1/24 <-> 198.18.0.2/24), one
# `ztmesh tunnel` each (100.64.0.1 <-> 100.64.0.2, MTU 1420), N pings
# INTERVAL apart through the tunnel; prints median, mean, p10 and p90 per
# build per round. For changes whose effect on latency is smaller than the
# spread of dataplane.sh's 20 pings.
#
#   sudo scripts/bench/rtt.sh DIR...   (each DIR holds a `ztmesh` binary)
#
# Environment: ROUNDS=3, N=100, INTERVAL=0.05 (bounded: ROUNDS x N pings).
set -euo pipefail
(($# > 0)) || { echo "usage: rtt.sh DIR..." >&2; exit 2; }
[[ $EUID -eq 0 ]] || { echo "rtt.sh: needs root" >&2; exit 1; }
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

one() { # DIR: prints the statistics of N pings through a fresh pair of tunnels
  local dir=$1 i
  ip netns add "$A"
  ip netns add "$B"
  ip -n "$A" link add veth0 type veth peer name veth0 netns "$B"
  ip -n "$A" addr add 198.18.0.1/24 dev veth0
  ip -n "$B" addr add 198.18.0.2/24 dev veth0
  for ns in "$A" "$B"; do ip -n "$ns" link set lo up; ip -n "$ns" link set veth0 up; done
  ip netns exec "$A" "$dir/ztmesh" tunnel --config "$WORK/a.conf" --interface "${TAG}a" --no-uapi >"$WORK/a.log" 2>&1 &
  PIDS+=($!)
  ip netns exec "$B" "$dir/ztmesh" tunnel --config "$WORK/b.conf" --interface "${TAG}b" --no-uapi >"$WORK/b.log" 2>&1 &
  PIDS+=($!)
  for i in $(seq 100); do
    ip netns exec "$A" ping -c 1 -W 1 100.64.0.2 >/dev/null 2>&1 && break
    sleep 0.1
  done
  ip netns exec "$A" timeout $((N + 30)) ping -c "$N" -i "$INTERVAL" 100.64.0.2 |
    sed -n 's/.*time=\([0-9.]*\).*/\1/p' | sort -g |
    awk '{v[NR] = $1; s += $1} END {if (NR == 0) {print "no replies"; exit}
      printf "median %.3f mean %.3f p10 %.3f p90 %.3f ms (%d replies)\n", v[int(NR / 2) + 1], s / NR, v[int(NR * 0.1) + 1], v[int(NR * 0.9)], NR}'
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
