#!/usr/bin/env bash
# Control-plane benchmark: ztmesh-loadgen (crate bench/loadgen/) against the
# real controller binary, everything on 127.0.0.1.
#
#   ztmesh-loadgen (1 tokio thread)                ztmesh-controller serve (child)
#   N simulated nodes = tokio tasks   --TLS/h2-->  127.0.0.1:<free port>
#   100 StreamNetMap streams per TLS connection    data dir in $TMPDIR, SIGKILLed
#   admin calls over DIR/admin.sock                and restarted for the storm
#
# For each size N: enroll N nodes for real (ed25519 machine keys, Enroll with
# proofs, one reusable tagged key per group of 100), open N authenticated
# netmap streams (every map's signature, serial and expiry verified), time
# `policy set` → every node holding the new policy (3 changes, each affecting
# all N nodes), SIGKILL + restart the controller and time until all N streams
# are resynced, and read the controller's VmRSS. Prints one table of medians
# over REPS runs.
#
# Environment:
#   REPS=3              runs per size (the table shows medians)
#   SIZES="1000 5000"   node counts
#   CHANGES=3           policy changes timed per run
#   GROUP=100           nodes per tag group (each node gets GROUP-1 peers)
#   BIN=target/release  where ztmesh-loadgen and ztmesh-controller are
#   CONTROLLER_BIN=PATH the controller to measure (default $BIN/ztmesh-controller),
#                       e.g. a baseline built in its own worktree and target dir
#   NO_BUILD=1          skip `cargo build --release`
#   OUT=FILE            also write the raw JSON lines there
#   ENGINES="sqlite"    the controller's store: sqlite (its data dir) and/or
#                       postgres (a throwaway cluster from scripts/pg.sh, with
#                       fsync on, a fresh database per run, over its unix
#                       socket), e.g. ENGINES="sqlite postgres" side by side;
#                       postgres2: two controllers on one PostgreSQL database,
#                       every other TLS connection on the second, the policy
#                       set on the first (no reconnect storm)
#   ALL_TO_ALL=1        every node reaches every other ("*"), one group of N
#                       (GROUP ignored): where a full map per change costs most
#   DELTAS="on"         the simulated nodes take netmap deltas (on, as the
#                       agent does) or full maps only (off); "off on" side by side
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

REPS=${REPS:-3}
SIZES=${SIZES:-"1000 5000"}
CHANGES=${CHANGES:-3}
GROUP=${GROUP:-100}
BIN=${BIN:-$ROOT/target/release}
CONTROLLER_BIN=${CONTROLLER_BIN:-$BIN/ztmesh-controller}

if [[ -z "${NO_BUILD:-}" ]]; then
    cargo build --release -p ztmesh-controller -p ztmesh-loadgen --bins >&2
fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

ENGINES=${ENGINES:-sqlite}
DELTAS=${DELTAS:-on}
for d in $DELTAS; do
    case $d in
    on | off) ;;
    *) echo "controlplane.sh: DELTAS takes on and/or off, not '$d'" >&2; exit 2 ;;
    esac
done
for engine in $ENGINES; do
    case $engine in
    sqlite | postgres | postgres2) ;;
    *) echo "controlplane.sh: unknown engine '$engine' (sqlite, postgres, postgres2)" >&2; exit 2 ;;
    esac
done
RAW=$(mktemp)
PG_DIR=
cleanup() {
    if [[ -n $PG_DIR ]]; then
        "$ROOT/scripts/pg.sh" stop "$PG_DIR"
        rm -rf "$PG_DIR"
    fi
    rm -f "$RAW"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
if [[ " $ENGINES " == *" postgres"* ]]; then
    PG_DIR=$(mktemp -d /tmp/ztmesh-bench-pg.XXXXXX)
    pg_env=$(ZTMESH_PG_DURABLE=1 "$ROOT/scripts/pg.sh" start "$PG_DIR")
    eval "$pg_env"
fi
db=0
for engine in $ENGINES; do
  for deltas in $DELTAS; do
    for n in $SIZES; do
        for rep in $(seq 1 "$REPS"); do
            echo "== $engine deltas=$deltas N=$n run $rep/$REPS" >&2
            database=
            if [[ $engine == postgres* ]]; then
                db=$((db + 1))
                psql -h "$ZTMESH_TEST_PG" -p "$ZTMESH_TEST_PG_PORT" \
                    -U postgres -d postgres -qAt -c "CREATE DATABASE bench$db" >/dev/null
                database="postgres://postgres@/bench$db?host=$ZTMESH_TEST_PG&port=$ZTMESH_TEST_PG_PORT"
            fi
            # The controller (the loadgen's child) reads ZTMESH_DATABASE.
            env ${database:+ZTMESH_DATABASE=$database} "$BIN/ztmesh-loadgen" --nodes "$n" --group-size "$GROUP" \
                --changes "$CHANGES" --controller-bin "$CONTROLLER_BIN" \
                $([[ $deltas == on ]] && echo --deltas) \
                $([[ $engine == postgres2 ]] && echo --two-controllers) \
                $([[ -n ${ALL_TO_ALL:-} ]] && echo --all-to-all) --json |
                tee >(cat >&2) | tail -n 1 |
                python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); r["engine"]=sys.argv[1]; print(json.dumps(r))' "$engine" >>"$RAW"
        done
    done
  done
done
if [[ -n "${OUT:-}" ]]; then
    cp "$RAW" "$OUT"
fi

python3 - "$RAW" "$REPS" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
reps = sys.argv[2]
key = lambda r: (r.get("engine", "sqlite"), "deltas" if r.get("deltas") else "full maps", r["nodes"], r["group_size"])
sizes = sorted({key(r) for r in rows})
med = lambda xs: statistics.median(xs)
cols = [
    ("enroll/s", lambda r: r["nodes"] / r["enroll_s"], "{:.0f}", "-"),
    ("first sync ms", lambda r: r["connect_ms"], "{:.0f}", "-"),
    ("policy ack ms", lambda r: med([c["ack_ms"] for c in r["changes"]]), "{:.0f}", "-"),
    ("controller CPU per change s", lambda r: med([c["controller_cpu_s"] for c in r["changes"]]), "{:.2f}", "-"),
    ("loadgen CPU per change s", lambda r: med([c.get("loadgen_cpu_s", float("nan")) for c in r["changes"]]), "{:.2f}", "-"),
    ("propagation p50 ms", lambda r: r["prop_p50_ms"], "{:.0f}", "-"),
    ("propagation p99 ms", lambda r: r["prop_p99_ms"], "{:.0f}", "<= 1000 at 10,000"),
    ("p99 on the first controller ms", lambda r: r.get("prop_first_p99_ms", float("nan")), "{:.0f}", "-"),
    ("p99 on the second controller ms", lambda r: r.get("prop_second_p99_ms", float("nan")), "{:.0f}", "-"),
    ("one join: enroll ack ms", lambda r: r["join_ack_ms"], "{:.1f}", "-"),
    ("one join: group peers updated ms", lambda r: r["join_max_ms"], "{:.1f}", "-"),
    ("one join: B received per updated node", lambda r: r["join_bytes_per_node"], "{:.0f}", "<= 1024 with deltas"),
    ("storm resync ms", lambda r: r.get("storm_ms", float("nan")), "{:.0f}", "<= 15000 at 10,000"),
    ("restart to serving ms", lambda r: r.get("restart_ready_ms", float("nan")), "{:.0f}", "-"),
    ("RSS fresh MiB", lambda r: r["rss0_kib"] / 1024, "{:.1f}", "-"),
    ("RSS N connected MiB", lambda r: r["rss_connected_kib"] / 1024, "{:.1f}", "-"),
    ("KiB per node", lambda r: r["kib_per_node"], "{:.1f}", "<= 10 at 10,000"),
    ("KiB per node after restart", lambda r: (r["rss_resynced_kib"] - r["rss0_kib"]) / r["nodes"] if "rss_resynced_kib" in r else float("nan"), "{:.1f}", "<= 10 at 10,000"),
    ("netmap message KiB (average)", lambda r: r["map_bytes_avg"] / 1024, "{:.1f}", "-"),
    ("deltas received", lambda r: r.get("deltas_received", 0), "{:.0f}", "-"),
]
print(f"\nmedians of {reps} runs per size")
print("| metric | " + " | ".join(f"{e}, {d}, N = {n:,} (groups of {g:,})" for e, d, n, g in sizes) + " | target |")
print("|---|" + "---|" * len(sizes) + "---|")
for name, f, fmt, target in cols:
    cells = []
    for k in sizes:
        vals = [f(r) for r in rows if key(r) == k]
        cells.append(fmt.format(med(vals)) + (f" ({fmt.format(min(vals))}–{fmt.format(max(vals))})" if len(vals) > 1 else ""))
    print(f"| {name} | " + " | ".join(cells) + f" | {target} |")
EOF
