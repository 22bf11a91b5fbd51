#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks for ztmesh's demo and tests. Idempotent.
set -euo pipefail
need=()
for pair in ip:iproute2 iperf3:iperf3 wg:wireguard-tools wireguard-go:wireguard-go ping:iputils-ping python3:python3; do
  cmd=${pair%%:*}; pkg=${pair##*:}
  command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
  echo "setup: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Wait for another apt/dpkg run (e.g. a second setup.sh) instead of failing.
  lock=(-o DPkg::Lock::Timeout=300)
  apt-get "${lock[@]}" update -qq
  apt-get "${lock[@]}" install -y -qq --no-install-recommends "${need[@]}"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust (https://rustup.rs) and rerun" >&2
  exit 1
fi
