#!/usr/bin/env bash
# Here, before a GPU check: put the pure-Python packages that the lent device machine's image lacks (it has CUDA
# torch, transformers, tokenizers, pytest, but not Hydra / OmegaConf) into .gpu_site/ (git-ignored), so
# runners/gpu_check.sh can run there without a network. Then, from the session's tools:
#   run(command="bash runners/gpu_check.sh", carry=[".gpu_site"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu_site
pip_=.venv/bin/pip
[ -x "$pip_" ] || pip_="python3 -m pip"
$pip_ install --quiet --no-deps --no-compile --target .gpu_site \
  "hydra-core>=1.3.2,<1.4" "omegaconf>=2.3" "antlr4-python3-runtime==4.9.3"
du -sh .gpu_site
