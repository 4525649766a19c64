"""Where the packaged configs and task definitions live, and the user cache directory."""

from __future__ import annotations

import os
from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _data_dir(name: str) -> Path:
    # Installed wheel: conf/ and tasks/ are shipped inside the package as _data/<name>.
    # Source checkout (editable install or running from the repo): the top-level folder.
    for cand in (_PKG / "_data" / name, _PKG.parent / name):
        if cand.is_dir():
            return cand
    raise RuntimeError(f"infllm-eval is installed without its '{name}' folder; reinstall the package.")


def conf_dir() -> Path:
    return _data_dir("conf")


def tasks_dir() -> Path:
    return _data_dir("tasks")


def cache_dir() -> Path:
    """User cache for converted model weights (override with INFLLM_EVAL_CACHE)."""
    root = os.environ.get("INFLLM_EVAL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "infllm-eval"
    )
    return Path(root)
