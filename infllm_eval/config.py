"""Composing and validating the Hydra config.

`compose(overrides)` uses Hydra's Compose API (for `run` pre-validation, `config`, tests and notebooks);
sweeps go through `@hydra.main` in `infllm_eval.cli` so launchers and multirun work. Every composed config is
validated here before any model loads: unknown group names get "Did you mean ...?", wrong types name the key and
the expected type.
"""

from __future__ import annotations

import difflib
import itertools
import os
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from infllm_eval.errors import UserError, unknown_name
from infllm_eval.paths import conf_dir, conf_dirs

GROUPS = ("model", "method", "task")


def group_options(group: str) -> dict[str, str]:
    """name -> one-line description, read from conf/<group>/*.yaml (and plugin folders' conf/<group>/, see
    `paths.conf_dirs`) without composing (instant); `task` also lists the task files (`tasks.hydra_group`). A name
    defined twice is refused: Hydra would pick one silently. Files whose name starts with "_" are shared parts
    that others extend (`conf/method/_base.yaml`), not options. A file without a `description:` key is described
    by its first comment line (presets, per-model files)."""
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
            out[p.stem] = _description(p)
    return out


def _description(path: Path) -> str:
    text = path.read_text()
    data = yaml.safe_load(text)
    if isinstance(data, dict) and data.get("description"):
        return str(data["description"]).strip()
    comments = (line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#"))
    return next((c for c in comments if c and not c.startswith("@package")), "")


def config_groups() -> list[str]:
    """Every config group a user can select: conf/<group>/ (nested ones as hydra/launcher) in every conf folder,
    and `task` (generated from the task files)."""
    names = {"task"}
    for folder in conf_dirs():
        names.update(p.parent.relative_to(folder).as_posix() for p in folder.rglob("*.yaml") if p.parent != folder)
    return sorted(names)


def _options(group: str) -> list[str]:
    """The options of `group`; for Hydra's own groups (hydra/launcher, ...) also what Hydra and its installed
    plugins provide (basic, joblib, submitit_slurm, ...). Call inside an initialized Hydra context."""
    if not group.startswith("hydra/"):
        return list(group_options(group))
    from hydra.core.global_hydra import GlobalHydra

    files = {p.stem for d in conf_dirs() for p in (d / group).glob("*.yaml")}
    return sorted(files | set(GlobalHydra.instance().config_loader().get_group_options(group)))


def _hydra_groups() -> list[str]:
    from hydra.core.global_hydra import GlobalHydra

    return [f"hydra/{g}" for g in GlobalHydra.instance().config_loader().list_groups("hydra")]


def searchpath_overrides() -> list[str]:
    """`hydra.searchpath=[...]` for the plugin folders' conf/ (none without INFLLM_EVAL_PATH)."""
    extra = conf_dirs()[1:]
    return [f"hydra.searchpath=[{','.join('file://' + str(d) for d in extra)}]"] if extra else []


def _parse(overrides: list[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise UserError(f"Bad override: {_first_line(e)} (overrides are key=value, e.g. model=tiny-llama).") from e


def _check_group_names(parsed: list, groups: list[str]) -> None:
    """Every `group=name` (also `+group=`, `group=a,b`) names an option of the group: Hydra skips a missing
    option of an optional group (preset, per_model, local) silently, which would run on the defaults."""
    from hydra.core.override_parser.types import ValueType

    for ov in parsed:
        group = ov.key_or_group
        if group not in groups or ov.is_delete() or ov.value_type == ValueType.GLOB_CHOICE_SWEEP:
            if "/" in group and group not in groups:
                raise unknown_name("config group", group, groups)
            continue
        values = list(ov.sweep_string_iterator()) if ov.is_sweep_override() else [ov.value()]
        valid = _options(group)
        for name in values:
            if name is None and group in GROUPS:
                raise unknown_name(group, "null", valid)
            if name is None:
                raise UserError(f"{group}=null is not an option; to choose no {group}, remove it with ~{group}.")
            if name not in valid:
                raise unknown_name(group, str(name), valid)


def _check_no_sweep(parsed: list, overrides: list[str]) -> None:
    for ov, text in zip(parsed, overrides):
        if ov.is_sweep_override():
            raise UserError(f"'{text}' is a sweep (a comma list or range): `run -m` / `plan -m` take one cell per "
                            "value; give a single value here, or add -m.")


def _check_keys(parsed: list, groups: list[str], ref: dict) -> None:
    """Each `key=value`, `+key=value`, `++key=value` and `~key` names a key the composed config (`ref`: composed
    with the same group choices and no key overrides) has: a typo gets the valid keys and "Did you mean", and an
    added key nobody reads, or a removed one the harness reads, is refused. Hydra's own settings (hydra.*) are
    Hydra's to check, except that a typo there also gets the valid keys."""
    for ov in parsed:
        key = ov.key_or_group
        if key in groups:
            continue
        found = _lookup(ref, key)
        if found is not _MISSING:
            if ov.is_add():
                raise UserError(f"'{key}' exists already; set it with {key}=... (without '+').")
            if ov.is_delete() and not key.startswith("hydra."):
                raise UserError(f"~{key} would remove a key the harness reads; set a value instead ({key}=...).")
            continue
        if key.startswith("hydra.") and (ov.is_add() or ov.is_force_add()):
            continue  # adding to Hydra's own free-form settings (hydra.launcher.additional_parameters, ...)
        raise _unknown_key(ref, key, groups)


_MISSING = object()
#: keys that belong to a group's choice: a task's definition file comes with task=<name>, never on its own
FIXED_KEYS = {"task.definition": "task="}


def _parts(key: str) -> list[str]:
    return [part.split("[")[0] for part in key.split(".")]


def _lookup(tree: Any, key: str) -> Any:
    for part in _parts(key):
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


def _unknown_key(ref: dict, key: str, groups: list[str]) -> UserError:
    parts = _parts(key)
    node, i = ref, 0
    while isinstance(node, dict) and parts[i] in node:
        node, i = node[parts[i]], i + 1
    parent, name = ".".join(parts[:i]), ".".join(parts[: i + 1])
    if not isinstance(node, dict):
        return UserError(f"'{parent}' holds a value ({node!r}), not keys, so '{key}' cannot be set.")
    keys = [k for k in node if i or k != "hydra"] + ([g for g in groups if "/" not in g] if not i else [])
    where = f" for {parts[0]} '{ref[parts[0]].get('name')}'" if i and parts[0] in GROUPS else ""
    close = difflib.get_close_matches(parts[i], keys, n=1)
    hint = f" Did you mean '{'.'.join([*parts[:i], close[0]])}'?" if close else ""
    listing = f"Keys of {parent}" if parent else "Top-level keys and groups"
    return UserError(f"Unknown key '{name}'{where}.{hint} {listing}: {', '.join(sorted(set(keys)))}.")


def _hydra_compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose

    return hydra_compose(config_name="config", overrides=[*overrides, *searchpath_overrides()],
                         return_hydra_config=True)


def _compose_full(overrides: list[str]) -> tuple[DictConfig, list[str]]:
    """The composed config with its `hydra` node (runtime choices), after checking every group name and key of
    `overrides`; returns it and the config groups."""
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from infllm_eval.tasks.hydra_group import register_task_group

    parsed = _parse(overrides)
    register_task_group()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        groups = config_groups()
        groups += [g for g in _hydra_groups() if g not in groups]
        _check_group_names(parsed, groups)
        _check_no_sweep(parsed, overrides)
        _check_fixed_keys(parsed)
        try:
            full, error = _hydra_compose(overrides), None
        except (HydraException, OmegaConfBaseException, ValueError) as e:
            full, error = None, e
        if error is not None:
            _check_group_adds(parsed, overrides, groups)
        adds_or_removes = any((o.is_add() or o.is_force_add() or o.is_delete()) and o.key_or_group not in groups
                              for o in parsed)
        if error is not None or adds_or_removes:
            ref = _reference(overrides, parsed, groups)
            if ref:
                _check_keys(parsed, groups, ref)
    if error is not None:
        raise UserError(f"Bad override: {_first_line(error)}") from error
    return full, groups


def _check_fixed_keys(parsed: list) -> None:
    for ov in parsed:
        if ov.key_or_group in FIXED_KEYS:
            how = FIXED_KEYS[ov.key_or_group]
            raise UserError(f"{ov.key_or_group} comes with {how}<name>; choose another with {how}<name> instead.")


def _check_group_adds(parsed: list, overrides: list[str], groups: list[str]) -> None:
    for ov, text in zip(parsed, overrides):
        if ov.is_add() and ov.key_or_group in groups:
            # every group of the root config is in its defaults list already
            raise UserError(f"'{text}' would add {ov.key_or_group} a second time; write {text.lstrip('+')} "
                            "(without '+').")


def _reference(overrides: list[str], parsed: list, groups: list[str]) -> dict:
    """The config composed with the same group choices and none of the key overrides, as plain containers."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    chosen = [text for text, ov in zip(overrides, parsed) if ov.key_or_group in groups]
    try:
        return OmegaConf.to_container(_hydra_compose(chosen), resolve=False)  # type: ignore[return-value]
    except (HydraException, OmegaConfBaseException):
        return {}


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose the root config with `overrides` (single run, no sweeps) and validate it. The result has an
    `invocation` node (see `invocation`): what was asked for, recorded in the run's config.yaml."""
    overrides = list(overrides)
    full, _ = _compose_full(overrides)
    choices = dict(full.hydra.runtime.choices)
    with open_dict(full):
        del full["hydra"]
        full["invocation"] = invocation(choices, overrides)
    validate(full)
    return full


def choices(overrides: list[str] | tuple[str, ...]) -> dict[str, str | None]:
    """group -> option of every config group (Hydra's runtime choices, e.g. 'hydra/launcher': 'slurm')."""
    full, _ = _compose_full(list(overrides))
    return dict(full.hydra.runtime.choices)


def invocation(choices: dict, overrides: list[str]) -> dict:
    """What produced a config, for its config.yaml and provenance.json: the overrides (`infllm-eval run` with
    them composes it again), the preset asked for, and the per-model and local files applied (None: none; an
    optional group's option that does not exist, as `per_model` is for most model x method pairs, is not
    applied). Never part of a result's content key."""
    def applied(group: str) -> str | None:
        name = choices.get(group)
        return name if name is not None and name in group_options(group) else None

    return {"overrides": [o.replace("${", "\\${") for o in overrides],
            "preset": choices.get("preset"), "per_model": applied("per_model"), "local": applied("local")}


def recorded_invocation(cfg: DictConfig) -> dict | None:
    """The `invocation` node of a composed config as a plain dict (for provenance.json); None without one."""
    node = cfg.get("invocation")
    return OmegaConf.to_container(node, resolve=True) if node is not None else None  # type: ignore[return-value]


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
    from infllm_eval.layout import LOCAL_LAYERS

    _need(cfg.get("local_layers") in LOCAL_LAYERS, "local_layers", " or ".join(LOCAL_LAYERS), cfg.get("local_layers"))
    for key in ("progress", "resume", "prefix_reuse"):
        _need(isinstance(cfg[key], bool), key, "true or false", cfg[key])
    timeout = cfg.get("sample_timeout_s")
    is_number = isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
    _need(timeout is None or (is_number and timeout > 0), "sample_timeout_s",
          "a positive number of seconds or null", timeout)
    off = cfg.get("offload_dir")
    _need(off is None or (isinstance(off, str) and off != ""), "offload_dir", "a directory path or null", off)
    parse_shard(cfg.get("shard"))
    _validate_run_name(cfg.run_name)
    for group in GROUPS:
        node = cfg.get(group)
        _need(isinstance(node, DictConfig) and "name" in node, group, "a config group selection", node)
    from infllm_eval.models import check_device_dtype

    check_device_dtype(cfg.device, cfg.dtype)
    _validate_task(cfg.task)
    _validate_model(cfg.model)
    _validate_bench(cfg.bench)


def _validate_run_name(run_name: str) -> None:
    """run_name is a path below output_dir: never absolute, never climbing out with '..'."""
    parts = Path(run_name).parts
    if Path(run_name).is_absolute() or ".." in parts:
        raise UserError(f"run_name must be a relative path below output_dir (no leading '/', no '..'), got "
                        f"{run_name!r}; set output_dir=... to write elsewhere.")


def _validate_bench(b: DictConfig) -> None:
    """`infllm-eval bench` settings (also checked for `run`: a config is valid as a whole or not at all)."""
    methods, lengths = _plain(b.methods), _plain(b.lengths)
    _need(isinstance(methods, list) and methods and all(isinstance(m, str) for m in methods), "bench.methods",
          "a non-empty list of method names (e.g. [full,infllm])", methods)
    valid = list(group_options("method"))
    for m in methods:
        if m not in valid:
            raise unknown_name("method in bench.methods", m, valid)
    _need(isinstance(lengths, list) and lengths and all(_is_int(x) and x > 0 for x in lengths), "bench.lengths",
          "a non-empty list of positive integers (e.g. [4096,8192])", lengths)
    _need(len(set(lengths)) == len(lengths), "bench.lengths", "a list without repeats", lengths)
    for key in ("decode_tokens", "repeats", "warmup_tokens", "peak_matmul_size"):
        _need(_is_int(b[key]) and b[key] > 0, f"bench.{key}", "a positive integer", b[key])
    _need(_is_int(b.prompt_build_length) and b.prompt_build_length >= 0, "bench.prompt_build_length",
          "a non-negative integer (0 = skip)", b.prompt_build_length)
    _need(isinstance(b.get("peer"), bool), "bench.peer", "true or false", b.get("peer"))
    frac = b.memory_fraction
    _need(isinstance(frac, (int, float)) and not isinstance(frac, bool) and 0 < frac <= 1, "bench.memory_fraction",
          "a number in (0, 1]", frac)
    _need(isinstance(b.output_dir, str) and b.output_dir != "", "bench.output_dir", "a non-empty string",
          b.output_dir)


def check_runnable(cfg: DictConfig) -> None:
    """What only the machine that runs `cfg` can check (validate checks values, not this machine): its device.
    Called before anything is created."""
    from infllm_eval.models import resolve_device_dtype

    resolve_device_dtype(cfg.device, cfg.dtype)
    offload_dir(cfg)


def offload_dir(cfg: DictConfig) -> str | None:
    """The run's `offload_dir` as an absolute path (None when unset); refuses one that is not an existing, writable
    directory (nothing is created for it: a scratch disk is the user's choice)."""
    off = cfg.get("offload_dir")
    if off is None:
        return None
    p = Path(str(off)).expanduser().resolve()
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"offload_dir '{off}' is not an existing writable directory; create it (on a disk with "
                        "room for the memory units: `infllm-eval plan` says how much) or unset it.")
    return str(p)


def _validate_task(t: DictConfig) -> None:
    if "lengths" in t:
        lengths = _plain(t.lengths)
        _need(
            isinstance(lengths, list) and lengths and all(_is_int(x) and x > 0 for x in lengths),
            "task.lengths", "a non-empty list of positive integers (e.g. [4096,16384])", lengths,
        )
    if "lengths" in t:
        _need(len(set(t.lengths)) == len(t.lengths), "task.lengths", "a list without repeats", _plain(t.lengths))
    if "depths" in t:
        depths = _plain(t.depths)
        _need(
            isinstance(depths, list) and depths
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1 for x in depths),
            "task.depths", "a non-empty list of numbers in [0, 1] (e.g. [0.1,0.5,0.9])", depths,
        )
        _need(len(set(depths)) == len(depths), "task.depths", "a list without repeats", depths)
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
        _need(isinstance(m.path, str) and m.path != "", "model.path", "a directory path", m.path)
    if "max_context" in m:
        _need(_is_int(m.max_context) and m.max_context > 0, "model.max_context", "a positive integer",
              m.max_context)
    stops = _plain(m.get("extra_stop_tokens"))
    _need(isinstance(stops, list) and all(isinstance(t, str) and t for t in stops), "model.extra_stop_tokens",
          "a list of token strings", stops)
    from infllm_eval.models import check_model_settings

    check_model_settings(m)


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
