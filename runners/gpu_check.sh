#!/usr/bin/env bash
# The GPU checks, on the lent device machine (its image's python3 holds CUDA torch; nothing can be downloaded
# there). Build .gpu_site here first (runners/gpu_site.sh) and carry it. Runs the GPU-marked tests (CUDA kernels:
# flash-attn or SDPA-efficient joined by log-sum-exp; offloaded units with pinned memory, the side stream of
# async_global_stream, faiss; full attention both routes) and writes the log to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONPATH="$PWD:$PWD/.gpu_site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  nvidia-smi -L
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'transformers', transformers.__version__)"
  python3 -c "import flash_attn; print('flash-attn', flash_attn.__version__)" 2>/dev/null || echo "flash-attn: not installed (SDPA-efficient path)"
  python3 -m pytest tests/test_methods.py -m gpu -v -p no:cacheprovider -o addopts="" --timeout 300
} 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
