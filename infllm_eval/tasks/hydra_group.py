"""The Hydra `task` group, generated from the task files: `task=<name>` selects tasks/<name>.yaml's run config.

Each task file (tasks/*.yaml and the plugin folders' tasks/*.yaml, not the "_" bases) gives one node,

    name: <file name>
    description: <its own description:> (not inherited)
    definition: <file name>
    <its run: section, usually inherited from a base through include:>

stored in Hydra's ConfigStore under group "task" before composing (`config.compose`, `cli._run_hydra`), so
`cfg.task` is exactly that node plus the run's overrides. Launchers that run cells in other processes (joblib,
submitit) carry the ConfigStore over with Hydra's singleton state.
"""

from __future__ import annotations

from pathlib import Path

from infllm_eval.errors import UserError
from infllm_eval.tasks import load_task_file, read_task_file, task_files

GROUP = "task"

#: (file, modification time) of every task file -> the nodes built from them, so composing again is cheap
_cache: dict[tuple[tuple[str, int], ...], dict[str, dict]] = {}


def run_node(name: str) -> dict:
    """The run config `task=<name>` composes: name, description, definition, then the file's `run:` keys."""
    description = read_task_file(task_files()[name]).get("description")  # the file's own, never an include's
    run = load_task_file(name).get("run")
    if not isinstance(description, str) or not description.strip():
        raise UserError(f"Task '{name}' has no 'description:' (one line for `infllm-eval ls tasks`); add one.")
    if not isinstance(run, dict):
        raise UserError(f"Task '{name}' has no 'run:' section (its own or through include:), so it cannot be "
                        "run; add one.")
    return {"name": name, "description": description.strip(), "definition": name, **run}


def run_nodes() -> dict[str, dict]:
    """name -> run node for every task file (see `run_node`), rebuilt only when a file changed."""
    files = task_files()
    key = _files_key(files)
    if key not in _cache:
        _cache.clear()
        _cache[key] = {name: run_node(name) for name in files}
    return _cache[key]


def _files_key(files: dict[str, Path]) -> tuple[tuple[str, int], ...]:
    paths = {*files.values(), *(p for f in files.values() for p in f.parent.glob("_*.yaml"))}
    return tuple(sorted((str(p), p.stat().st_mtime_ns) for p in paths))


def task_options() -> dict[str, str]:
    """name -> one-line description of every task, for `ls tasks` and "Did you mean" (no composing)."""
    return {name: node["description"] for name, node in run_nodes().items()}


def register_task_group() -> None:
    """Store every task's run node in Hydra's ConfigStore as `task/<name>`, replacing what an earlier call
    stored (a plugin folder may have left INFLLM_EVAL_PATH since)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.repo.pop(GROUP, None)
    for name, node in run_nodes().items():
        store.store(group=GROUP, name=name, node=node)
