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
# A clean clone gains nothing from incremental state, which was a quarter of
# target/ (4.5 GiB); a developer who wants it sets CARGO_INCREMENTAL=1.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
target_dir="${CARGO_TARGET_DIR:-target}"
disk() { echo "== disk: $1: $(du -sh "$target_dir" 2>/dev/null | cut -f1) in $target_dir, $(df -h --output=avail "$PWD" | tail -1 | tr -d ' ') free"; }
disk start
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
# --workspace, as above, so the test binaries are reused, not rebuilt with
# the controller's own feature set (only the controller has these targets).
ZTMESH_TEST_STORE=postgres cargo test --workspace --test grpc --test hostile_clients \
  -- --test-threads="${ZTMESH_TEST_THREADS:-2}"
disk end
echo "== all tests passed"
