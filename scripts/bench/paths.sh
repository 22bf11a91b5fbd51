#!/usr/bin/env bash
# Paths benchmark (issue 11): the NAT lab of tests/tests/relay_paths.rs — an
# "internet" switch (198.18.0.0/24) with the controller and a real
# ztmesh-relay, two homes behind nftables NAT routers, one daemon in each —
# built on release binaries, and per path, from one run:
#
#   relayed over QUIC        both routers `masquerade fully-random`
#   relayed over TLS/TCP     the same, and router a drops all UDP
#   direct after punching    both routers plain `masquerade`
#   standalone tunnel        the direct pair's keys, addresses, MTU and NAT
#                            mappings under `ztmesh tunnel` (the baseline)
#
# it prints the time from a's `ztmesh up` to the first packet over the path,
# iperf3 TCP single stream a -> b (Gbit/s received) and the relay's CPU
# seconds (utime+stime) during that stream, per Gbit.
#
# The lab and the measurement are the ignored test `bench_paths` in
# tests/tests/relay_paths.rs (one home for the topology); this script builds
# release binaries and runs it.
#
# Environment:
#   PATHS_SECS=10   iperf3 duration per stream
#   PATHS_REPS=3    streams per path (the table shows medians)
#   BIN=target/release  where ztmesh, ztmesh-controller, ztmesh-relay and
#                   ztm-echo are (copy them aside if others build there)
#   NO_BUILD=1      skip `cargo build --release`
#   ZTMESH_LOG=warn log level of the processes (printed only on failure)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

if [[ $EUID -ne 0 ]]; then
    echo "paths.sh: needs root (network namespaces, TUN devices, nftables)" >&2
    exit 1
fi
for tool in iperf3 nft ip; do
    command -v "$tool" >/dev/null || { echo "paths.sh: $tool not found (scripts/setup.sh)" >&2; exit 1; }
done

if [[ -z "${NO_BUILD:-}" ]]; then
    cargo build --release --bins -p ztmesh-node -p ztmesh-controller -p ztmesh-relay -p ztmesh-tests >&2
fi
export ZTMESH_BIN_DIR=${BIN:-$ROOT/target/release}
export PATHS_SECS=${PATHS_SECS:-10} PATHS_REPS=${PATHS_REPS:-3}
export ZTMESH_LOG=${ZTMESH_LOG:-warn}
# The test binary itself is small; release keeps it consistent with the rest.
exec cargo test --release -p ztmesh-tests --test relay_paths -- \
    --ignored --exact bench_paths --nocapture --test-threads=1
