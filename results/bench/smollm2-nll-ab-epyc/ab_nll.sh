#!/usr/bin/env bash
# Issue 26: bench of full and infllm before (b1b4a0e^) and after (b1b4a0e) the token-log-prob contract, alternated.
# Each version runs from its own worktree (cwd first on sys.path; spawned cells inherit sys.path).
for rep in 0 1; do
  for v in before after; do
    cd /work/wt-$v
    echo "=== $(date -u +%T) rep $rep $v $(/work/main/.venv/bin/python -c 'import infllm_eval; print(infllm_eval.__file__)')"
    /work/main/.venv/bin/python -m infllm_eval.cli bench 'bench.methods=[full,infllm]' 'bench.lengths=[8192]' \
      bench.prompt_build_length=0 bench.output_dir=/work/logs/ab-nll/$v-$rep 2>&1 | grep -E "method=|decode_ms"
  done
done
