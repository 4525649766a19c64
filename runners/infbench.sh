#!/usr/bin/env bash
# ∞-Bench as a sweep over task configs. Usage: bash runners/infbench.sh [paper|all] [overrides...]
#   paper: the 7 columns of InfLLM Table 1 (R.PK, R.Num, R.KV, Choice, QA, Sum, Math.F)
#   all:   the 12 ∞-Bench tasks
# e.g. bash runners/infbench.sh paper model=mistral method=infllm preset=mistral-infbench
set -euo pipefail
cd "$(dirname "$0")/.."
PAPER=infbench_passkey,infbench_number_string,infbench_kv_retrieval,infbench_longbook_choice_eng,infbench_longbook_qa_eng,infbench_longbook_sum_eng,infbench_math_find
ALL=$PAPER,infbench_longbook_qa_chn,infbench_longdialogue_qa_eng,infbench_math_calc,infbench_code_run,infbench_code_debug
case "${1:-paper}" in
  paper) TASKS=$PAPER ;;
  all) TASKS=$ALL ;;
  *) echo "usage: $0 [paper|all] [overrides...]" >&2; exit 2 ;;
esac
shift || true
exec .venv/bin/infllm-eval run -m "task=$TASKS" "$@"
