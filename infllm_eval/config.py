"""Composing and validating the Hydra config.

`compose(overrides)` uses Hydra's Compose API (for `run` pre-validation, `config`, tests and notebooks);
sweeps go through `@hydra.main` in `infllm_eval.cli` so launchers and multirun work. Every composed config is
validated here before any model loads: unknown group names get "Did you mean ...?", wrong types name the key and
the expected type.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from infllm_eval.errors import UserError, unknown_name
from infllm_eval.paths import conf_dir, conf_dirs

GROUPS = ("model", "method", "task")


def group_options(group: str) -> dict[str, str]:
    """name -> one-line description, read from conf/<group>/*.yaml (and plugin folders' conf/<group>/, see
    `paths.conf_dirs`) without composing (instant); `task` also lists the task files (`tasks.hydra_group`). A name
    defined twice is refused: Hydra would pick one silently. Files whose name starts with "_" are shared parts
    that others extend (`conf/method/_base.yaml`), not options."""
    out: dict[str, str] = {}
    seen: dict[str, Path] = {}
    if group == "task":
        from infllm_eval.tasks import task_files
        from infllm_eval.tasks.hydra_group import task_options

        out.update(task_options())
        seen.update(task_files())
    for folder in conf_dirs():
        for p in sorted((folder / group).glob("*.yaml")):
            if p.stem in seen:
                raise UserError(f"{group} '{p.stem}' is defined twice ({seen[p.stem]} and {p}); rename one.")
            seen[p.stem] = p
            if p.stem.startswith("_"):
                continue
            data = yaml.safe_load(p.read_text()) or {}
            out[p.stem] = str(data.get("description", "")).strip()
    return out


def searchpath_overrides() -> list[str]:
    """`hydra.searchpath=[...]` for the plugin folders' conf/ (none without INFLLM_EVAL_PATH)."""
    extra = conf_dirs()[1:]
    return [f"hydra.searchpath=[{','.join('file://' + str(d) for d in extra)}]"] if extra else []


def _check_group_names(overrides: list[str]) -> None:
    for ov in overrides:
        key, sep, value = ov.lstrip("+~").partition("=")
        if sep and key in GROUPS:
            valid = list(group_options(key))
            for name in value.split(","):
                if name not in valid:
                    raise unknown_name(key, name, valid)


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose the root config with `overrides` (single run, no sweeps) and validate it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from infllm_eval.tasks.hydra_group import register_task_group

    overrides = list(overrides)
    _check_group_names(overrides)
    register_task_group()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=[*overrides, *searchpath_overrides()])
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(f"Bad override: {_first_line(e)}") from e
    validate(cfg)
    return cfg


def _first_line(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    return msg[0] if msg else type(e).__name__


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Cartesian product of comma-list / range sweeps, as Hydra's basic sweeper does; one override list per cell."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise UserError(f"Bad override: {_first_line(e)}") from e
    axes = []
    for ov in parsed:
        key = ov.get_key_element()
        if ov.is_sweep_override():
            axes.append([f"{key}={v}" for v in ov.sweep_string_iterator()])
        else:
            axes.append([f"{key}={ov.get_value_element_as_str()}"])
    return [list(cell) for cell in itertools.product(*axes)]


# -- validation -------------------------------------------------------------------------------------------------
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _need(cond: bool, key: str, expected: str, value: Any) -> None:
    if not cond:
        raise UserError(f"{key} must be {expected}, got {value!r}.")


def _plain(x: Any) -> Any:
    return OmegaConf.to_container(x, resolve=True) if isinstance(x, (DictConfig, ListConfig)) else x


def validate(cfg: DictConfig) -> None:
    """Type and value checks for everything a user can override. Raises UserError (one sentence)."""
    _need(_is_int(cfg.seed), "seed", "an integer", cfg.seed)
    _need(_is_int(cfg.chunk_size) and cfg.chunk_size > 0, "chunk_size", "a positive integer", cfg.chunk_size)
    for key in ("device", "dtype", "output_dir", "run_name"):
        _need(isinstance(cfg[key], str) and cfg[key] != "", key, "a non-empty string", cfg[key])
    for key in ("progress", "resume"):
        _need(isinstance(cfg[key], bool), key, "true or false", cfg[key])
    timeout = cfg.get("sample_timeout_s")
    is_number = isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
    _need(timeout is None or (is_number and timeout > 0), "sample_timeout_s",
          "a positive number of seconds or null", timeout)
    parse_shard(cfg.get("shard"))
    for group in GROUPS:
        node = cfg.get(group)
        _need(isinstance(node, DictConfig) and "name" in node, group, "a config group selection", node)
    _validate_task(cfg.task)
    _validate_model(cfg.model)


def _validate_task(t: DictConfig) -> None:
    if "lengths" in t:
        lengths = _plain(t.lengths)
        _need(
            isinstance(lengths, list) and lengths and all(_is_int(x) and x > 0 for x in lengths),
            "task.lengths", "a non-empty list of positive integers (e.g. [4096,16384])", lengths,
        )
    if "depths" in t:
        depths = _plain(t.depths)
        _need(
            isinstance(depths, list) and depths
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1 for x in depths),
            "task.depths", "a non-empty list of numbers in [0, 1] (e.g. [0.1,0.5,0.9])", depths,
        )
    if "samples" in t:
        _need(_is_int(t.samples) and t.samples > 0, "task.samples", "a positive integer", t.samples)
    if t.get("max_new_tokens") is not None:
        _need(_is_int(t.max_new_tokens) and t.max_new_tokens > 0, "task.max_new_tokens",
              "a positive integer or null", t.max_new_tokens)
    if "profile" in t:  # the task's own prompt profiles (infllm / official for the shipped ones)
        from infllm_eval.tasks import load_definition

        profiles = list(load_definition(str(t.definition)).get("profiles") or {})
        _need(t.profile in profiles, "task.profile", " or ".join(profiles), t.profile)
    if "truncation" in t:
        policies = ("none", "middle", "head_tail", "skip")
        _need(t.truncation in policies, "task.truncation", " | ".join(policies), t.truncation)
    for key in ("max_length", "limit"):
        if t.get(key) is not None:
            _need(_is_int(t[key]) and t[key] > 0, f"task.{key}", "a positive integer or null", t[key])
    if t.get("data_dir") is not None:
        _need(isinstance(t.data_dir, str) and t.data_dir != "", "task.data_dir", "a folder path or null", t.data_dir)
    if t.get("truncation", "none") != "none" and t.get("max_length") is None:
        raise UserError(f"task.truncation={t.truncation} needs task.max_length (the model's window in tokens).")


def _validate_model(m: DictConfig) -> None:
    for key in ("chat_template", "answer_prefix", "trust_remote_code"):
        if key in m:
            _need(isinstance(m[key], bool), f"model.{key}", "true or false", m[key])
    if m.get("path") is not None:
        _need(isinstance(m.path, str), "model.path", "a directory path", m.path)


def parse_shard(value: Any) -> tuple[int, int] | None:
    """`shard=i/n` (0 <= i < n): run every n-th sample starting at i; None = all samples."""
    if value is None:
        return None
    i, sep, n = str(value).partition("/")
    if not (sep and i.strip().isdigit() and n.strip().isdigit() and 0 <= int(i) < int(n)):
        raise UserError(f"shard must be 'i/n' with 0 <= i < n (e.g. shard=0/4), got {value!r}.")
    return int(i), int(n)


def resolved_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def check_output_dir(path: str | Path) -> Path:
    """Create the output dir (or fail in one sentence if it cannot be written)."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"Output directory '{p}' is not writable ({e.strerror}); set output_dir=... to a writable path.") from e
    return p


def tool_defaults(section: str) -> dict:
    """Defaults of a results / planning command (`report`, `check`, `plan`), from conf/tools.yaml (the only
    place they live; not part of a run's config)."""
    return dict((yaml.safe_load((conf_dir() / "tools.yaml").read_text()) or {}).get(section) or {})
