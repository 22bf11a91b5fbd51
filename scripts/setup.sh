#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks for ztmesh's demo and tests. Idempotent.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
need=()
# node, npm, chromium and curl: the browser-login tests (tests/web, tests/src/web.rs).
# lintian, man and systemd-analyze: the packaging check (scripts/package.sh --check).
for pair in lintian:lintian man:man-db systemd-analyze:systemd dpkg-shlibdeps:dpkg-dev git:git ip:iproute2 iperf3:iperf3 wg:wireguard-tools wireguard-go:wireguard-go ping:iputils-ping nft:nftables python3:python3 \
  curl:curl node:nodejs npm:npm chromium:chromium chromedriver:chromium-driver openssl:openssl psql:postgresql-client; do
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
# Installs a Debian package whose own service must not run on the host:
# policy-rc.d keeps it from starting during the install (and is never left
# behind: it would keep every service on the host from starting), and where
# systemd runs the service is disabled. Only a service this script just
# installed: one the machine already had (and ran) is none of our business.
install_without_service() {
  local pkg=$1 service=$2
  echo "setup: installing $pkg"
  export DEBIAN_FRONTEND=noninteractive
  local lock=(-o DPkg::Lock::Timeout=300)
  local policy=/usr/sbin/policy-rc.d made_policy=0 status=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    made_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  { apt-get "${lock[@]}" update -qq &&
    apt-get "${lock[@]}" install -y -qq --no-install-recommends "$pkg"; } || status=$?
  if ((made_policy)); then rm -f "$policy"; trap - EXIT; fi
  ((status == 0)) || exit "$status"
  if [[ -d /run/systemd/system ]] && systemctl is-enabled --quiet "$service" 2>/dev/null; then
    systemctl disable --now "$service" >/dev/null 2>&1 || true
  fi
}
# Prometheus and promtool: the metrics test (tests/tests/metrics.rs) starts
# its own Prometheus in a test namespace.
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  install_without_service prometheus prometheus
fi
# PostgreSQL: scripts/pg.sh starts a throwaway cluster for the store and
# controller tests.
if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
  install_without_service postgresql postgresql
fi
# The OpenID provider and the browser driver, exactly as the committed lockfile
# pins them (no install scripts: neither package needs one). The stamp inside
# node_modules (which npm ci recreates) says which lockfile it was built from.
web="$root/tests/web"
lock_sum=$(sha256sum "$web/package-lock.json" | cut -d' ' -f1)
stamp="$web/node_modules/.ztmesh-lock.sha256"
if [[ ! -f $stamp || $(cat "$stamp") != "$lock_sum" ]]; then
  echo "setup: npm ci in tests/web"
  (cd "$web" && npm ci --no-audit --no-fund --ignore-scripts)
  echo "$lock_sum" >"$stamp"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust (https://rustup.rs) and rerun" >&2
  exit 1
fi
# Debian packages (scripts/package.sh). Pinned: 3.8.0 builds with rustc 1.95.
CARGO_DEB_VERSION=3.8.0
if ! command -v cargo-deb >/dev/null 2>&1; then
  echo "setup: installing cargo-deb $CARGO_DEB_VERSION"
  cargo install --locked cargo-deb --version "$CARGO_DEB_VERSION"
fi
# Supply-chain audit (scripts/deny.sh). Pinned: 0.20.2 builds with rustc 1.95
# and reads the offline advisory snapshot the way deny.toml expects.
CARGO_DENY_VERSION=0.20.2
if ! command -v cargo-deny >/dev/null 2>&1; then
  echo "setup: installing cargo-deny $CARGO_DENY_VERSION"
  cargo install --locked cargo-deny --version "$CARGO_DENY_VERSION"
fi
