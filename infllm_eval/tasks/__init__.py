"""Task files and builders: a task is one file, tasks/<name>.yaml (also in plugin folders, `paths.tasks_dirs`).

The file holds the task's definition (what the builder reads: prompts, profiles, metric, `builder:`), its
`description:` and its `run:` section, the run config `task=<name>` composes (`infllm_eval.tasks.hydra_group`).
Files starting with "_" are shared bases that task files `include:`. The builder classes register themselves in
TASK_BUILDERS and are imported on the first lookup.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from infllm_eval.errors import UserError, unknown_name
from infllm_eval.paths import tasks_dirs
from infllm_eval.registry import Registry

if TYPE_CHECKING:
    from infllm_eval.tasks.base import Render, Sample, Task

__all__ = [
    "TASK_BUILDERS", "Render", "Sample", "Task", "as_plain_dict", "definition_names", "load_definition",
    "load_task_file", "make_task", "read_task_file", "task_files",
]

#: builder name (the definition's `builder:` key) -> task class; the classes register with
#: `@TASK_BUILDERS.register("name")`, their modules are imported on the first lookup.
TASK_BUILDERS: Registry[type] = Registry(
    "task builder", modules=("infllm_eval.tasks.passkey", "infllm_eval.tasks.benchmark"))

#: Keys of a task file that describe the task to the CLI and Hydra, not to its builder (and so stay out of the
#: definition, which the benchmark fingerprint hashes whole).
TASK_FILE_KEYS = ("description", "run")

#: A YAML loader: libyaml's when present (the same documents, about 10x faster: `ls tasks` reads every file).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def __getattr__(name: str) -> Any:
    """`Render`, `Sample`, `Task` from tasks.base on first use, so reading task files does not import torch."""
    if name in ("Render", "Sample", "Task"):
        from infllm_eval.tasks import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: Inheritance depth limit for `include:` chains (a cycle is an error long before this).
_MAX_INCLUDE_DEPTH = 8


def as_plain_dict(cfg: Any) -> dict:
    """A plain dict from an OmegaConf DictConfig, a Mapping, or an object with attributes."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return dict(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(cfg, Mapping):
        return dict(cfg)
    return dict(vars(cfg))


def task_files() -> dict[str, Path]:
    """name -> file of every task in tasks/ and the plugin folders' tasks/ (files starting with "_" are shared
    bases, not tasks). A name defined twice is refused: which one runs would depend on INFLLM_EVAL_PATH's order."""
    files: dict[str, Path] = {}
    for folder in tasks_dirs():
        for path in sorted(folder.glob("*.yaml")):
            if path.stem.startswith("_"):
                continue
            if path.stem in files:
                raise UserError(f"task '{path.stem}' is defined twice ({files[path.stem]} and {path}); rename one.")
            files[path.stem] = path
    return files


def definition_names() -> list[str]:
    """Names of the tasks (see `task_files`), sorted."""
    return sorted(task_files())


def load_task_file(name: str) -> dict:
    """tasks/<name>.yaml with its `include:` chain merged (the including file's keys win), `description` and `run`
    included. `include: _longbench.yaml` pulls in a shared base; mappings merge key by key, everything else is
    replaced. An unknown name is a UserError listing the available tasks."""
    files = task_files()
    if name not in files:
        raise unknown_name("task definition", name, sorted(files))
    return _load_with_includes(files[name], depth=0)


def load_definition(name: str) -> dict:
    """The definition of task `name` (what its builder reads): its merged file without TASK_FILE_KEYS."""
    data = load_task_file(name)
    return {key: value for key, value in data.items() if key not in TASK_FILE_KEYS}


def read_task_file(path: Path) -> dict:
    """One task file as written (no includes merged)."""
    with path.open(encoding="utf-8") as fh:
        try:
            data = yaml.load(fh, Loader=_LOADER)  # noqa: S506 - a safe loader
        except yaml.YAMLError as e:
            raise UserError(f"Task definition {path} is not valid YAML ({str(e).splitlines()[0]}); fix the file.") from e
    if not isinstance(data, dict):
        raise UserError(f"Task definition {path} is not a YAML mapping; fix or restore the file.")
    return data


def _load_with_includes(path: Path, depth: int) -> dict:
    if depth > _MAX_INCLUDE_DEPTH:
        raise UserError(f"Task definition {path} has an include chain deeper than {_MAX_INCLUDE_DEPTH} (a cycle?).")
    data = read_task_file(path)
    parent = data.pop("include", None)
    if not parent:
        return data
    return _merge(_load_with_includes(_include_path(path, str(parent)), depth + 1), data)


def _include_path(path: Path, parent: str) -> Path:
    """The included file: next to the including one, else in tasks/ or a plugin folder's tasks/ (so a plugin's
    task can `include: _longbench.yaml`)."""
    for folder in (path.parent, *tasks_dirs()):
        if (folder / parent).is_file():
            return folder / parent
    raise UserError(f"Task definition {path} includes '{parent}', which is not a file in {path.parent}.")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def make_task(task_cfg: Any, tokenizer: Any, render: Render, *, answer_prefix: bool, seed: int) -> Task:
    """Build the task of a run config (`cfg.task`, composed from tasks/<name>.yaml's `run:`).

    `task_cfg.definition` picks tasks/<definition>.yaml; the definition's `builder:` key picks the class in
    TASK_BUILDERS.
    """
    cfg = as_plain_dict(task_cfg)
    definition_name = str(cfg["definition"])
    definition = load_definition(definition_name)
    builder = definition.get("builder")
    if not builder:
        raise UserError(f"Task definition '{definition_name}' has no 'builder:' key; add one.")
    cls = TASK_BUILDERS.get(str(builder))
    return cls(cfg, definition, tokenizer, render, answer_prefix=answer_prefix, seed=seed)
