#!/usr/bin/env bash
# Fuzzing campaign: runs each cargo-fuzz target for a bounded time, starting
# from its committed corpus, and copies every crash it finds into that corpus
# (where `cargo test` replays it from then on, on the stable toolchain).
#
#   scripts/fuzz.sh                     # every target, 60 s each
#   scripts/fuzz.sh -t 120 node_proof   # one target, 120 s
#   ZTMESH_FUZZ_SANITIZER=none scripts/fuzz.sh   # without AddressSanitizer
#
# Toolchain: nightly when rustup has it; otherwise the stable toolchain with
# RUSTC_BOOTSTRAP=1 (cargo-fuzz needs -Z flags). cargo-fuzz is installed here
# when missing (not in setup.sh: CI replays corpora, it does not fuzz).
# New coverage goes to target/fuzz-work/TARGET (not committed); set
# ZTMESH_FUZZ_MERGE=1 to merge it, minimized, into the committed corpus.
# Exit status: 0 when no target crashed, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

seconds=${ZTMESH_FUZZ_SECONDS:-60}
if [[ ${1:-} == -t ]]; then
  seconds=${2:-}
  shift $(( $# >= 2 ? 2 : 1 ))
fi
if ! [[ $seconds =~ ^[0-9]+$ ]] || (( seconds < 1 || seconds > 3600 )); then
  echo "fuzz: -t takes 1-3600 seconds" >&2
  exit 2
fi

# Every target lives in the one cargo-fuzz project fuzz/ (fuzz/Cargo.toml).
known=(policy_parse node_proof key_token stun metrics_request relay_frames packet_parse filter_inbound device_udp wgconf_parse uapi_set dns_query)
targets=("$@")
if ((${#targets[@]} == 0)); then
  targets=("${known[@]}")
fi
for t in "${targets[@]}"; do
  [[ " ${known[*]} " == *" $t "* ]] || { echo "fuzz: unknown target $t (known: ${known[*]})" >&2; exit 2; }
done

toolchain=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  toolchain=(+nightly)
  echo "fuzz: toolchain nightly ($(rustc +nightly --version))"
else
  export RUSTC_BOOTSTRAP=1
  echo "fuzz: no nightly toolchain; stable with RUSTC_BOOTSTRAP=1 ($(rustc --version))"
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install --locked cargo-fuzz --version 0.13.2
fi
sanitizer=${ZTMESH_FUZZ_SANITIZER:-address}

summary=()
crashed=0
for t in "${targets[@]}"; do
  dir=$root/fuzz
  corpus=$dir/corpus/$t
  work=$root/target/fuzz-work/$t
  artifacts=$root/target/fuzz-artifacts/$t
  log=$root/target/fuzz-logs/$t.log
  mkdir -p "$corpus" "$work" "$artifacts" "$(dirname "$log")"
  # Only this run's findings: earlier artifacts are already in the corpus.
  rm -f "$artifacts"/*
  echo "== fuzz $t for ${seconds}s (corpus ${corpus#"$root"/})"
  set +e
  (cd "$dir" && cargo "${toolchain[@]}" fuzz run --sanitizer "$sanitizer" "$t" "$work" "$corpus" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=4096 \
    -artifact_prefix="$artifacts/" -print_final_stats=1) >"$log" 2>&1
  status=$?
  set -e
  execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1)
  found=0
  for f in "$artifacts"/crash-* "$artifacts"/oom-* "$artifacts"/timeout-* "$artifacts"/leak-*; do
    [[ -f $f ]] || continue
    cp "$f" "$corpus/$(basename "$f")"
    found=$((found + 1))
    echo "fuzz: $t: $(basename "$f") copied into ${corpus#"$root"/}"
  done
  if (( found == 0 && status != 0 )); then
    echo "fuzz: $t exited with status $status and no artifact; see ${log#"$root"/}" >&2
    tail -20 "$log" >&2
    found=1
  fi
  if (( found > 0 )); then crashed=1; fi
  if [[ ${ZTMESH_FUZZ_MERGE:-0} == 1 && $found == 0 ]]; then
    (cd "$dir" && cargo "${toolchain[@]}" fuzz run --sanitizer "$sanitizer" "$t" "$corpus" "$work" -- -merge=1) >>"$log" 2>&1
  fi
  summary+=("$(printf '%-16s %12s execs  %s findings' "$t" "${execs:-?}" "$found")")
done
echo "== fuzz summary (${seconds}s per target)"
printf '%s\n' "${summary[@]}"
exit "$crashed"
