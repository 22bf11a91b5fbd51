#!/usr/bin/env bash
# Times backup and restore of a controller whose database holds 200,000 flow
# rows (about 25 MB), as BENCHMARKS.md reports. Usage:
#   scripts/bench/backup.sh [path/to/ztmesh-controller]   (default: target/release, else target/debug)
# Runs the controller in its own network namespace (198.18.0.1), removed on exit.
set -u
cd "$(dirname "$0")/../.."
BIN=${1:-target/release/ztmesh-controller}
[ -x "$BIN" ] || BIN=target/debug/ztmesh-controller
for t in python3 /usr/bin/time; do command -v "$t" >/dev/null || { echo "needs $t" >&2; exit 1; }; done
NS=ztm-bkmeasure-$$
W=$(mktemp -d /tmp/bkmeasure.XXXX)
cleanup() { [ -n "${PID:-}" ] && kill "$PID" 2>/dev/null; wait "${PID:-}" 2>/dev/null; ip netns del "$NS" 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT
ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" addr add 198.18.0.1/32 dev lo
D=$W/data
# First start creates the schema; stop it, then add rows.
ip netns exec "$NS" "$BIN" serve --data-dir "$D" --listen 198.18.0.1:8443 >/dev/null 2>&1 & PID=$!
for i in $(seq 1 100); do [ -S "$D/admin.sock" ] && break; sleep 0.1; done
kill $PID; wait $PID; PID=
python3 - "$D/ztmesh.db" <<'PY'
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
rows = [(1796300000000+i, i%50, f"node{i%50}", f"100.64.0.{i%250}", "100.64.1.1", 6, 443, 1, "p:1", "", 10, 1000, 9, 900, 1, 2) for i in range(200000)]
c.executemany("INSERT INTO flows (time_ms,node_id,node_name,src,dst,proto,dst_port,allowed,rule_id,reason,packets,bytes,reply_packets,reply_bytes,first_seen_ms,last_seen_ms) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
c.commit()
PY
ip netns exec "$NS" "$BIN" serve --data-dir "$D" --listen 198.18.0.1:8443 --flow-max-age 0s --flow-max-rows 0 --flow-max-rows-per-node 0 >/dev/null 2>&1 & PID=$!
for i in $(seq 1 100); do ip netns exec "$NS" "$BIN" nodes list --data-dir "$D" >/dev/null 2>&1 && break; sleep 0.1; done
ls -l "$D/ztmesh.db"
"$BIN" backup keygen --out "$W/id" > "$W/recipient" 2>/dev/null
echo "pass phrase for measuring" > "$W/pass"
echo "== backup --recipient"; /usr/bin/time -f "%e s wall, %M KiB max RSS (CLI)" ip netns exec "$NS" "$BIN" backup "$W/r.bak" --recipient "$(cat $W/recipient)" --data-dir "$D"
echo "== backup --passphrase-file"; /usr/bin/time -f "%e s wall, %M KiB max RSS (CLI)" ip netns exec "$NS" "$BIN" backup "$W/p.bak" --passphrase-file "$W/pass" --data-dir "$D"
grep VmHWM /proc/$PID/status
kill $PID; wait $PID; PID=
echo "== restore --identity"; /usr/bin/time -f "%e s wall, %M KiB max RSS" "$BIN" restore "$W/r.bak" --identity "$W/id" --data-dir "$W/new1" | tail -2
echo "== restore --passphrase-file"; /usr/bin/time -f "%e s wall, %M KiB max RSS" "$BIN" restore "$W/p.bak" --passphrase-file "$W/pass" --data-dir "$W/new2" | tail -2
ls -l "$W/r.bak" "$W/p.bak" "$W/new1/ztmesh.db"
