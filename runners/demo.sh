#!/usr/bin/env bash
# The main job on the embedded default: install, then passkey retrieval with SmolLM2 + full attention at 2K and 4K.
set -euo pipefail
cd "$(dirname "$0")/.."
bash runners/setup.sh
.venv/bin/infllm-eval run "$@"
