#!/usr/bin/env bash
# CPU regression gate: every sweep under results/baselines/ (NAME.args, one override per line) is run and checked
# sample by sample against its committed baseline NAME.csv: tiny-model cells and a real SmolLM2 InfLLM cell.
#   bash runners/regression.sh            # run + check all (exit 1 on a significant drop or new failures;
#                                         # 2 when a baseline cannot be compared: check's own exit codes)
#   bash runners/regression.sh tiny-passkey            # one baseline
#   bash runners/regression.sh --update [NAME...]      # run + overwrite the baseline(s); commit them with the change
# OUT=dir picks the run root (default results/runs/regression, git-ignored); each baseline runs in OUT/NAME.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/runs/regression}
BIN=${INFLLM_EVAL:-.venv/bin/infllm-eval}
UPDATE=0
if [[ "${1:-}" == "--update" ]]; then UPDATE=1; shift; fi
NAMES=("$@")
if [[ ${#NAMES[@]} -eq 0 ]]; then
  for f in results/baselines/*.args; do NAMES+=("$(basename "$f" .args)"); done
fi
status=0
for name in "${NAMES[@]}"; do
  BASE=results/baselines/$name
  [[ -f "$BASE.args" ]] || { echo "no baseline named '$name': expected $BASE.args" >&2; exit 2; }
  mapfile -t ARGS < <(grep -v '^\s*#' "$BASE.args" | grep -v '^\s*$')
  "$BIN" run -m "${ARGS[@]}" "output_dir=$OUT/$name"
  if [[ $UPDATE == 1 ]]; then
    "$BIN" report "$OUT/$name" --out "$OUT/$name/report" > /dev/null
    cp "$OUT/$name/report/tidy.csv" "$BASE.csv"
    echo "baseline updated: $BASE.csv"
  else
    echo "## $name"
    rc=0; "$BIN" check "$OUT/$name" --baseline "$BASE.csv" || rc=$?
    if (( rc > status )); then status=$rc; fi
  fi
done
exit $status
