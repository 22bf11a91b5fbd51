#!/usr/bin/env bash
# Runs the whole test suite: format check, the offline supply-chain audit
# (scripts/deny.sh), clippy with -D warnings, the packaging check
# (scripts/package.sh --check on the debug build), then `cargo test --workspace`
# (unit, property, fuzz-corpus replay, in-process gRPC and, as root,
# end-to-end tests in network namespaces). Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh

export CARGO_TERM_COLOR=never
# No config file of an installed ztmesh (/etc/ztmesh/*.toml) reaches the
# binaries the tests start.
export ZTMESH_NODE_CONFIG= ZTMESH_CONTROLLER_CONFIG=
# The metrics test skips without prometheus/promtool only on a developer's
# machine; here setup.sh installed them, so their absence is a failure.
export ZTMESH_REQUIRE_PROMETHEUS=1
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo deny (offline advisory snapshot, licenses, bans, sources)"
./scripts/deny.sh
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo build (binaries used by end-to-end tests)"
cargo build --workspace --bins
echo "== packages: build, install into a fresh tree, check (scripts/package.sh)"
# The debug binaries just built, so no release build: files, modes,
# conffiles, lintian, systemd-analyze security and verify.
./scripts/package.sh --check --profile dev
echo "== PostgreSQL test cluster (scripts/pg.sh)"
# The store suite and the controller's PostgreSQL tests run against it; it
# is stopped and removed on exit, whatever happens.
pg_dir=$(mktemp -d /tmp/ztmesh-pg.XXXXXX)
trap './scripts/pg.sh stop "$pg_dir"; rm -rf "$pg_dir"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# Two steps: `eval "$(…)"` would hide a failed start from `set -e`.
pg_env=$(./scripts/pg.sh start "$pg_dir")
eval "$pg_env"
export ZTMESH_REQUIRE_POSTGRES=1
echo "== cargo test"
cargo test --workspace -- --test-threads="${ZTMESH_TEST_THREADS:-2}"
echo "== cargo test: the controller's gRPC suites again, on PostgreSQL"
ZTMESH_TEST_STORE=postgres cargo test -p ztmesh-controller --test grpc --test hostile_clients \
  -- --test-threads="${ZTMESH_TEST_THREADS:-2}"
echo "== all tests passed"
