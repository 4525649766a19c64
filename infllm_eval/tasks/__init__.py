"""Task registry: a task definition (tasks/<definition>.yaml) names a builder, imported lazily."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import yaml

from infllm_eval.errors import UserError, unknown_name
from infllm_eval.paths import tasks_dir
from infllm_eval.tasks.base import Render, Sample, Task

__all__ = [
    "TASK_BUILDERS", "Render", "Sample", "Task", "as_plain_dict", "definition_names", "load_definition", "make_task",
]

#: builder name (the definition yaml's `builder:` key) -> "module:Class", imported only when used.
TASK_BUILDERS: dict[str, str] = {
    "passkey": "infllm_eval.tasks.passkey:PasskeyTask",
    "benchmark": "infllm_eval.tasks.benchmark:BenchmarkTask",
}

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


def definition_names() -> list[str]:
    """Names of the task definitions in tasks/ (files starting with "_" are shared bases, not tasks)."""
    return sorted(p.stem for p in tasks_dir().glob("*.yaml") if not p.stem.startswith("_"))


def load_definition(name: str) -> dict:
    """Read tasks/<name>.yaml with its `include:` chain merged (the including file's keys win).

    `include: _longbench.yaml` pulls in a shared base; mappings merge key by key, everything else is
    replaced. An unknown name is a UserError listing the available definitions.
    """
    folder = tasks_dir()
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise unknown_name("task definition", name, definition_names())
    return _load_with_includes(path, depth=0)


def _read_yaml(path) -> dict:
    with path.open(encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as e:
            raise UserError(f"Task definition {path} is not valid YAML ({str(e).splitlines()[0]}); fix the file.") from e
    if not isinstance(data, dict):
        raise UserError(f"Task definition {path} is not a YAML mapping; fix or restore the file.")
    return data


def _load_with_includes(path, depth: int) -> dict:
    if depth > _MAX_INCLUDE_DEPTH:
        raise UserError(f"Task definition {path} has an include chain deeper than {_MAX_INCLUDE_DEPTH} (a cycle?).")
    data = _read_yaml(path)
    parent = data.pop("include", None)
    if not parent:
        return data
    parent_path = path.parent / str(parent)
    if not parent_path.is_file():
        raise UserError(f"Task definition {path} includes '{parent}', which is not a file in {path.parent}.")
    return _merge(_load_with_includes(parent_path, depth + 1), data)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _builder_class(builder: str) -> type:
    if builder not in TASK_BUILDERS:
        raise unknown_name("task builder", builder, list(TASK_BUILDERS))
    module_name, _, class_name = TASK_BUILDERS[builder].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def make_task(task_cfg: Any, tokenizer: Any, render: Render, *, answer_prefix: bool, seed: int) -> Task:
    """Build the task named by the run config (`conf/task/*.yaml`) from its definition yaml.

    `task_cfg.definition` picks tasks/<definition>.yaml (defaults to `task_cfg.name`); the yaml's
    `builder:` key picks the class in TASK_BUILDERS.
    """
    cfg = as_plain_dict(task_cfg)
    definition_name = cfg.get("definition") or cfg.get("name")
    if not definition_name:
        raise UserError("The task config needs a 'definition' (or 'name') naming a file in tasks/.")
    definition = load_definition(str(definition_name))
    builder = definition.get("builder")
    if not builder:
        raise UserError(f"Task definition '{definition_name}' has no 'builder:' key; add one.")
    cls = _builder_class(str(builder))
    return cls(cfg, definition, tokenizer, render, answer_prefix=answer_prefix, seed=seed)
