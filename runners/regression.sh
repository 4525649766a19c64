#!/usr/bin/env bash
# CPU regression gate: a 2 x 2 tiny-model sweep (results/baselines/tiny-passkey.args, one override per line)
# checked sample by sample against the committed baseline results/baselines/tiny-passkey.csv.
#   bash runners/regression.sh            # run + check (exit 1 on a significant drop or new failures)
#   bash runners/regression.sh --update   # run + overwrite the baseline (commit it with the change that explains it)
# OUT=dir picks the run root (default results/runs/regression, git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=results/baselines/tiny-passkey
OUT=${OUT:-results/runs/regression}
BIN=${INFLLM_EVAL:-.venv/bin/infllm-eval}
mapfile -t ARGS < <(grep -v '^\s*#' "$BASE.args" | grep -v '^\s*$')
"$BIN" run -m "${ARGS[@]}" "output_dir=$OUT"
if [[ "${1:-}" == "--update" ]]; then
  "$BIN" report "$OUT" --out "$OUT/report" > /dev/null
  cp "$OUT/report/tidy.csv" "$BASE.csv"
  echo "baseline updated: $BASE.csv"
else
  "$BIN" check "$OUT" --baseline "$BASE.csv"
fi
