#!/usr/bin/env bash
# Supply-chain audit, offline: `cargo deny check` (advisories, bans, licenses,
# sources) against the RustSec advisory snapshot shipped next to the repo.
#
# CI cannot reach the advisory database's home, so the database is a git
# bundle in ../shared/data/ (relative to the repo root; a fresh CI clone sits
# at the same place). ZTMESH_ADVISORY_BUNDLE overrides the path. The bundle
# is checked out under target/advisory-dbs/ (the directory name cargo-deny
# derives from the default database URL), and deny.toml points db-path there.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

bundle=${ZTMESH_ADVISORY_BUNDLE:-$root/../shared/data/advisory-db.bundle}
if [[ ! -f $bundle ]]; then
  cat >&2 <<MSG
deny: advisory snapshot not found at $bundle
deny: CI expects the RustSec snapshot as a git bundle in ../shared/data/ next to
deny: the repository (see that directory's README); set ZTMESH_ADVISORY_BUNDLE
deny: to its path to use another location. Refusing to audit without it.
MSG
  exit 1
fi
if ! command -v cargo-deny >/dev/null 2>&1; then
  echo "deny: cargo-deny is not installed; run scripts/setup.sh" >&2
  exit 1
fi

# cargo-deny's directory name for https://github.com/rustsec/advisory-db.
dbs=$root/target/advisory-dbs
db=$dbs/advisory-db-3157b0e258782691
want=$(git bundle list-heads "$bundle" | awk '$2 == "HEAD" || $2 ~ /refs\/heads\// {print $1; exit}')
if [[ -z $want ]]; then
  echo "deny: $bundle is not a readable git bundle" >&2
  exit 1
fi
have=$(git -C "$db" rev-parse HEAD 2>/dev/null || true)
if [[ $have != "$want" ]]; then
  rm -rf "$db"
  mkdir -p "$dbs"
  git clone -q "$bundle" "$db"
fi
# The snapshot's age is the date of its newest advisory (the commit itself is
# a repackaging and carries the upstream commit in its subject).
newest=$(grep -rhoE '^date = "[0-9]{4}-[0-9]{2}-[0-9]{2}"' "$db/crates" | sort | tail -1 | tr -dc '0-9-')
age_days=$(( ($(date +%s) - $(date -d "$newest" +%s)) / 86400 ))
echo "deny: advisory snapshot: $(git -C "$db" log -1 --format=%s); newest advisory $newest ($age_days days old)"
if (( age_days > 120 )); then
  echo "deny: warning: the newest advisory is over 120 days old; ask for a newer snapshot in ../shared/data/" >&2
fi

# --offline reads every crate from the local cache: fetch them first
# (crates.io is reachable; the advisory database is not).
cargo fetch --locked -q
ZTMESH_ADVISORY_DBS=$dbs cargo deny --offline --locked check advisories bans licenses sources
