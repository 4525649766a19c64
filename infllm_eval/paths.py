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


def plugin_dirs() -> list[Path]:
    """Folders named by INFLLM_EVAL_PATH (os.pathsep-separated): each may hold `conf/<group>/*.yaml` and
    `tasks/*.yaml` that extend the packaged ones (a plugin's configs; its code joins through the `infllm_eval`
    entry point group, `infllm_eval.registry`)."""
    raw = os.environ.get("INFLLM_EVAL_PATH", "")
    return [Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p.strip()]


def conf_dirs() -> list[Path]:
    """The packaged conf/ first, then each plugin folder's conf/."""
    return [conf_dir(), *(d / "conf" for d in plugin_dirs() if (d / "conf").is_dir())]


def tasks_dirs() -> list[Path]:
    """The packaged tasks/ first, then each plugin folder's tasks/."""
    return [tasks_dir(), *(d / "tasks" for d in plugin_dirs() if (d / "tasks").is_dir())]
