#!/usr/bin/env bash
# Relay benchmark (sketch): the real ztmesh-relay binary on 127.0.0.1 and
# relay_load (relay/examples/relay_load.rs) as its clients.
#
#   relay_load blast: node 1 --QUIC or TLS/TCP--> ztmesh-relay --> node 2
#   relay_load idle:  COUNT sessions held open, relay VmRSS read before/after
#
# Prints, per transport: datagram throughput through the relay (received
# Gbit/s at 1,312-byte datagrams, loss), relay CPU seconds per Gbit
# forwarded (utime+stime from /proc/PID/stat), and relay memory per
# connected node (VmRSS delta / COUNT). Not yet the issue's end-to-end
# figure (a TCP stream through two ztmesh nodes using the relay): that
# needs the node's relay path, and belongs in the netns benchmark then.
#
# Environment:
#   SECONDS_RUN=10      blast duration per transport
#   SIZE=1312           datagram size (a full tunnel packet)
#   IDLE=1000           sessions for the memory figure
#   BIN=target/release  where ztmesh-relay and examples/relay_load are
#   NO_BUILD=1          skip `cargo build --release`
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

SECONDS_RUN=${SECONDS_RUN:-10}
SIZE=${SIZE:-1312}
IDLE=${IDLE:-1000}
BIN=${BIN:-$ROOT/target/release}

if [[ -z "${NO_BUILD:-}" ]]; then
    cargo build --release -p ztmesh-relay --bins --example relay_load >&2
fi
RELAY=$BIN/ztmesh-relay
LOAD=$BIN/examples/relay_load

WORK=$(mktemp -d)
RELAY_PID=
cleanup() {
    [[ -n $RELAY_PID ]] && kill "$RELAY_PID" 2>/dev/null && wait "$RELAY_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

"$LOAD" keygen "$WORK/keys"
ulimit -n 65536 2>/dev/null || true
"$RELAY" serve --name bench --data-dir "$WORK/relay" \
    --quic-listen 127.0.0.1:0 --tcp-listen 127.0.0.1:0 --stun-listen 127.0.0.1:0 \
    --controller-key-file "$WORK/keys/controller.pub" \
    --max-nodes $((IDLE + 16)) --max-conns-per-source $((IDLE + 16)) \
    >"$WORK/identity.json" 2>"$WORK/relay.log" &
RELAY_PID=$!
for _ in $(seq 100); do
    [[ -s $WORK/identity.json ]] && break
    sleep 0.1
done
[[ -s $WORK/identity.json ]] || { cat "$WORK/relay.log" >&2; exit 1; }

cpu_ticks() { awk '{print $14 + $15}' "/proc/$RELAY_PID/stat"; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$RELAY_PID/status"; }
HZ=$(getconf CLK_TCK)

printf '%-6s %12s %8s %16s\n' transport "Gbit/s" loss "CPU s per Gbit"
for t in quic tcp; do
    before=$(cpu_ticks)
    line=$("$LOAD" blast "$WORK/keys" "$WORK/relay" "$t" "$SECONDS_RUN" "$SIZE")
    after=$(cpu_ticks)
    python3 - "$line" "$before" "$after" "$HZ" "$t" <<'PY'
import json, sys
r = json.loads(sys.argv[1]); before, after, hz = map(int, sys.argv[2:5])
gbit = r["received_bytes"] * 8 / 1e9
cpu = (after - before) / hz
print(f'{sys.argv[5]:<6} {r["received_gbit_s"]:12.2f} {r["loss"]:8.3f} {cpu / max(gbit, 1e-9):16.2f}')
PY
done

rss0=$(rss_kib)
"$LOAD" idle "$WORK/keys" "$WORK/relay" quic "$IDLE" 120 >"$WORK/idle.out" &
LOAD_PID=$!
for _ in $(seq 1200); do
    [[ -s $WORK/idle.out ]] && break
    sleep 0.1
done
[[ -s $WORK/idle.out ]] || { echo "idle sessions did not connect" >&2; exit 1; }
sleep 2
rss1=$(rss_kib)
kill "$LOAD_PID" 2>/dev/null; wait "$LOAD_PID" 2>/dev/null || true
echo "relay memory per connected node (QUIC): $(( (rss1 - rss0) * 1024 / IDLE )) bytes (VmRSS $rss0 -> $rss1 KiB, $IDLE sessions)"
"$RELAY" stats --data-dir "$WORK/relay" | python3 -c 'import json,sys; s=json.load(sys.stdin); print("drops:", {k:v for k,v in s["drops"].items() if v})'
