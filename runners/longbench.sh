#!/usr/bin/env bash
# LongBench v1 as a sweep over task configs. Usage: bash runners/longbench.sh [paper|all|e] [overrides...]
#   paper: the 16 English tasks of InfLLM Table 5 (InfLLM scripts/longbench.sh)
#   all:   the 21 LongBench datasets
#   e:     the 13 LongBench-E datasets (scores by length bucket 0-4k / 4-8k / 8k+)
# e.g. bash runners/longbench.sh paper model=mistral method=infllm preset=mistral-longbench-6k
set -euo pipefail
cd "$(dirname "$0")/.."
PAPER=longbench_narrativeqa,longbench_qasper,longbench_multifieldqa_en,longbench_hotpotqa,longbench_2wikimqa,longbench_musique,longbench_gov_report,longbench_qmsum,longbench_multi_news,longbench_trec,longbench_triviaqa,longbench_samsum,longbench_passage_count,longbench_passage_retrieval_en,longbench_lcc,longbench_repobench-p
ALL=$PAPER,longbench_multifieldqa_zh,longbench_dureader,longbench_vcsum,longbench_lsht,longbench_passage_retrieval_zh
E=longbench_qasper_e,longbench_multifieldqa_en_e,longbench_hotpotqa_e,longbench_2wikimqa_e,longbench_gov_report_e,longbench_multi_news_e,longbench_trec_e,longbench_triviaqa_e,longbench_samsum_e,longbench_passage_count_e,longbench_passage_retrieval_en_e,longbench_lcc_e,longbench_repobench-p_e
case "${1:-paper}" in
  paper) TASKS=$PAPER ;;
  all) TASKS=$ALL ;;
  e) TASKS=$E ;;
  *) echo "usage: $0 [paper|all|e] [overrides...]" >&2; exit 2 ;;
esac
shift || true
exec .venv/bin/infllm-eval run -m "task=$TASKS" "$@"
