#!/usr/bin/env bash
# Install, then run the whole test suite (CPU; GPU-only tests are skipped without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash runners/setup.sh
.venv/bin/python -m pytest "$@"
