"""`infllm-eval plan`: a dry run. Cells, samples, tokens and each cell's estimated peak memory, no weights.

Memory model (bytes; b = bytes per element of the run's dtype, kv = 2 * n_kv_heads * head_dim * b per token
per layer, C = min(chunk_size, length), T = length + max_new_tokens):
- weights: the parameter count from the model's shape (embeddings, attention, MLP, norms, untied LM head) * b;
- KV, all layers: the tokens each method says it keeps on the device and in host memory at T tokens
  (`ContextMethod.memory_model`, from its params alone): full (and NTK / PI) T tokens; streamingllm / lminfinite
  their window buffer, n_init + n_local + 2C + 64 tokens; infllm its local window + remainder buffer
  (2 * (n_local + block_size + exc_block_size)), n_init, and the device cache of max(topk, max_cached_block) units
  of block_size tokens when offloading (all units without offloading); infllm's offloaded units
  (T - n_local - n_init tokens) count as host memory;
- models mixing sliding-window and global layers (Gemma 2 / 3, `layer_types` or `sliding_window_pattern` in the
  shape): with local_layers=native the method's K/V counts on the global layers only, the local layers keep
  their window buffer (`SlidingWindowAttention.memory_model`: W + 2C + 64 tokens);
- workspace of one layer: the fp32 score tile (n_heads * q_tile * the keys the method scores a tile against
  * 4; q_tile is `method.params.q_tile`, the value the method runs with) plus the chunk's activations (q/k/v/o
  and the MLP: C * (2 * hidden + (n_heads + 2 n_kv_heads) * head_dim + 3 * intermediate) * b).
- runtime: the process's own memory (Python, torch, transformers, tokenizer), `plan.runtime_gb` in
  conf/tools.yaml (measured), in host memory.
On CPU, host and device are the same memory, so the peak is the sum. These are estimates (allocator slack and
framework overhead are not counted): good for "does it fit", not for the last gigabyte. The model's shape
comes from a cached config.json (model.path or the local Hugging Face cache, never a download), else
`model.tiny` or `model.shape` in conf/model/*.yaml.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from infllm_eval.config import compose, parse_shard
from infllm_eval.errors import UserError
from infllm_eval.config import tool_defaults

SHAPE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
GIB = 2**30


def model_shape(model: DictConfig) -> dict:
    """hidden_size, intermediate_size, layers, heads, kv heads, head_dim, vocab_size, tie_word_embeddings."""
    m = OmegaConf.to_container(model, resolve=True)
    shape = _cached_config(m) or m.get("tiny") or m.get("shape")
    if not shape or any(k not in shape for k in SHAPE_KEYS):
        raise UserError(
            f"Model '{m['name']}' has no shape for planning; add model.shape (hidden_size, "
            "intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, vocab_size) "
            f"to conf/model/{m['name']}.yaml."
        )
    out = {k: int(shape[k]) for k in SHAPE_KEYS}
    out["head_dim"] = int(shape.get("head_dim") or out["hidden_size"] // out["num_attention_heads"])
    out["vocab_size"] = int(shape.get("vocab_size") or 0)
    out["tie_word_embeddings"] = bool(shape.get("tie_word_embeddings", False))
    out["sliding_window"], out["layer_types"] = _layer_types(shape, out["num_hidden_layers"])
    return out


def model_layer_types(name: str) -> tuple[int | None, list[str]]:
    """(window, per-layer type) of conf/model/<name>.yaml's shape (or tiny), without composing or loading."""
    from infllm_eval.paths import conf_dirs

    for folder in conf_dirs():
        p = folder / "model" / f"{name}.yaml"
        if p.is_file():
            m = OmegaConf.to_container(OmegaConf.load(p), resolve=False)
            shape = m.get("tiny") or m.get("shape") or {}
            return _layer_types(shape, int(shape.get("num_hidden_layers") or 0))
    return None, []


def _layer_types(shape: dict, n: int) -> tuple[int | None, list[str]]:
    """(window, per-layer type) of a model that mixes sliding-window and global layers, from `layer_types` or
    Gemma 3's `sliding_window_pattern` (every n-th layer global); (None, all global) for any other model."""
    from infllm_eval.layout import GLOBAL, LOCAL

    window, types, pattern = shape.get("sliding_window"), shape.get("layer_types"), shape.get("sliding_window_pattern")
    if window and types:
        return int(window), [str(t) for t in types]
    if window and pattern:
        return int(window), [GLOBAL if (i + 1) % int(pattern) == 0 else LOCAL for i in range(n)]
    return None, [GLOBAL] * n


def _cached_config(m: dict) -> dict | None:
    """config.json of model.path, or of the hub id in the local HF cache (no network, no weights)."""
    if m.get("path"):
        p = Path(str(m["path"])).expanduser() / "config.json"
        return json.loads(p.read_text()) if p.is_file() else None
    if m.get("source") != "hub":
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        p = try_to_load_from_cache(m["id"], "config.json", revision=m.get("revision"))
    except Exception:  # noqa: BLE001 - any cache problem means "not cached": fall back to conf numbers
        return None
    return json.loads(Path(p).read_text()) if isinstance(p, str) and Path(p).is_file() else None


def n_params(s: dict) -> int:
    h, i, H, Hkv, D = (
        s["hidden_size"],
        s["intermediate_size"],
        s["num_attention_heads"],
        s["num_key_value_heads"],
        s["head_dim"],
    )
    layer = h * H * D + 2 * h * Hkv * D + H * D * h + 3 * h * i + 2 * h
    embed = s["vocab_size"] * h * (1 if s["tie_word_embeddings"] else 2)
    return s["num_hidden_layers"] * layer + embed + h


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device.split(":")[0]
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype_bytes(dtype: str, device: str) -> tuple[str, int]:
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    if dtype not in DTYPE_BYTES:
        raise UserError(f"dtype '{dtype}' is unknown; use auto, float32, bfloat16 or float16.")
    return dtype, DTYPE_BYTES[dtype]


def estimate(cfg: DictConfig, length: int, device: str) -> dict:
    """Estimated bytes for one sample of `length` tokens: weights, device KV, host KV, workspace, peak. The method
    (its class, from the registry; torch is imported here, not when plan is) says what it keeps."""
    from infllm_eval.methods import make_method

    method = make_method(cfg.method)
    s = model_shape(cfg.model)
    dtype, b = _dtype_bytes(str(cfg.dtype), device)
    L, H, Hkv, D = s["num_hidden_layers"], s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"]
    T = length + _max_new_tokens(cfg)
    C = min(int(cfg.chunk_size), length)
    mem = method.memory_model(T, C, device)
    off = cfg.get("offload_dir") is not None
    kv = kv_bytes_model(mem, L, H, Hkv, D, b, off)
    if s["sliding_window"] and str(cfg.local_layers) == "native":
        from infllm_eval.layout import LOCAL
        from infllm_eval.methods.sliding import SlidingWindowAttention

        n_local = s["layer_types"].count(LOCAL)
        local = SlidingWindowAttention(s["sliding_window"], fattn=True, q_tile=method.q_tile).memory_model(T, C, device)
        kv = kv_bytes_model(mem, L - n_local, H, Hkv, D, b, off)
        kv = {k: kv[k] + v for k, v in kv_bytes_model(local, n_local, H, Hkv, D, b, False).items()}
    work = H * min(method.q_tile, C) * mem["workspace_keys"] * 4
    work += C * (2 * s["hidden_size"] + (H + 2 * Hkv) * D + 3 * s["intermediate_size"]) * b
    work += s["vocab_size"] * 4
    weights = n_params(s) * b
    runtime = int(float(tool_defaults("plan").get("runtime_gb") or 0) * 1e9)
    return {
        "dtype": dtype,
        "weights": weights,
        "kv_device": kv["device"],
        "kv_host": kv["host"],
        "kv_disk": kv["disk"],
        "workspace": work,
        "runtime": runtime,
        "peak": weights + kv["device"] + work + (kv["host"] + runtime if device == "cpu" else 0),
    }


def kv_bytes_model(mem: dict, n_layers: int, H: int, Hkv: int, D: int, b: int, offload_dir: bool) -> dict[str, int]:
    """Bytes a method's `memory_model` (per layer) comes to over `n_layers` layers of K/V heads Hkv x D with
    b-byte elements: on the device, in host memory, on disk. Memory units (`unit_tokens`, inside the device or
    host tokens as `units_on` says) count in their `unit_dtype` (None: b bytes) and, with an offload_dir, on disk;
    representative vectors (`repr_vectors`, n_heads x D each, compute dtype) where `repr_on` says (default the
    device), never on disk (every lookup scores them all)."""
    per_token = 2 * Hkv * D
    dev, host = mem["device_tokens"], mem["host_tokens"]
    units, where = mem.get("unit_tokens", 0), mem.get("units_on", "device")
    if where == "host":
        host -= units
    else:
        dev -= units
    out = {"device": dev * per_token * b, "host": host * per_token * b, "disk": 0}
    ub = DTYPE_BYTES[mem["unit_dtype"]] if mem.get("unit_dtype") else b
    out["disk" if offload_dir else where] += units * per_token * ub
    out[mem.get("repr_on", "device")] += mem.get("repr_vectors", 0) * H * D * b
    return {k: v * n_layers for k, v in out.items()}


def _max_new_tokens(cfg: DictConfig) -> int:
    """`task.max_new_tokens`, else its prompt profile's (as the task itself decides: `tasks.base`)."""
    from infllm_eval.tasks import load_definition
    from infllm_eval.tasks.base import max_new_tokens, pick_profile

    _, profile = pick_profile(load_definition(str(cfg.task.definition)), cfg.task.profile)
    return max_new_tokens(cfg.task.max_new_tokens, profile)


def _samples_per_length(cfg: DictConfig) -> tuple[list[int], int, str]:
    """(lengths, samples per length, note), as the task's builder plans it (`plan_samples(task_cfg,
    max_context)`, no tokenizer); a builder that cannot say gives the model's context and an unknown count."""
    from infllm_eval.tasks import TASK_BUILDERS, load_definition

    builder = TASK_BUILDERS.get(str(load_definition(str(cfg.task.definition))["builder"]))
    if not hasattr(builder, "plan_samples"):
        return [int(cfg.model.max_context)], 0, "the task's builder does not plan its samples"
    task = OmegaConf.to_container(cfg.task, resolve=True)
    return builder.plan_samples(task, int(cfg.model.max_context))


def budget_bytes(budget_gb: float | None, device: str) -> int:
    """The device memory a cell may use: --budget-gb, else conf/tools.yaml `plan.budget_gb`, else this machine's
    (its GPU's for a CUDA target, its RAM for a CPU one). A CUDA target this machine has no GPU for needs a budget:
    planning for a machine you are not on is what plan is for."""
    if budget_gb is None:
        budget_gb = tool_defaults("plan").get("budget_gb")
    if budget_gb is not None:
        return _gb("--budget-gb", budget_gb)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("This machine has no CUDA GPU to take the memory budget from; pass --budget-gb "
                            "(e.g. --budget-gb 80 for one 80 GB GPU) or set plan.budget_gb in conf/tools.yaml.")
        return int(torch.cuda.get_device_properties(0).total_memory)
    return _host_ram()


def host_budget_bytes(host_budget_gb: float | None) -> int:
    """The host memory a cell may use (offloaded KV, and everything on a CPU target): --host-budget-gb, else
    conf/tools.yaml `plan.host_budget_gb`, else this machine's RAM."""
    if host_budget_gb is None:
        host_budget_gb = tool_defaults("plan").get("host_budget_gb")
    return _host_ram() if host_budget_gb is None else _gb("--host-budget-gb", host_budget_gb)


def _gb(option: str, value) -> int:
    try:
        gb = float(value)
    except (TypeError, ValueError):
        gb = float("nan")
    if not gb > 0 or gb == float("inf"):
        raise UserError(f"{option} must be a positive number of GiB (e.g. 80); got {value!r}.")
    return int(gb * GIB)


def _host_ram() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def plan_cells(cells: list[list[str]], budget_gb: float | None = None,
               host_budget_gb: float | None = None) -> list[dict]:
    """One row per cell x length: samples, tokens, memory estimate, whether its device part fits the device
    budget and its host part (offloaded KV; all of it on a CPU target) the host budget."""
    host_budget = host_budget_bytes(host_budget_gb)
    rows = []
    for cell, overrides in enumerate(cells):
        cfg = compose(overrides)
        from infllm_eval.methods import make_method

        make_method(cfg.method)  # a bad method parameter is named before anything else is looked at
        device = _resolve_device(str(cfg.device))
        budget = budget_bytes(budget_gb, device)
        lengths, per, note = _samples_per_length(cfg)
        shard = parse_shard(cfg.get("shard"))
        disk_free = _disk_free(cfg.get("offload_dir"))
        for length in lengths:
            n = per if not shard else len(range(shard[0], per, shard[1]))
            e = estimate(cfg, length, device)
            host = e["peak"] if device == "cpu" else e["kv_host"] + e["runtime"]  # on CPU device memory is host
            fits_disk = disk_free is None or e["kv_disk"] <= disk_free
            rows.append(
                {
                    "cell": cell,
                    "model": cfg.model.name,
                    "method": cfg.method.name,
                    "task": cfg.task.name,
                    "length": length,
                    "samples": n,
                    "tokens": n * (length + _max_new_tokens(cfg)),
                    "device": device,
                    **e,
                    "host": host,
                    "budget": budget,
                    "host_budget": host_budget,
                    "fits_device": e["peak"] <= budget,
                    "fits_host": host <= host_budget,
                    "disk_free": disk_free,
                    "fits_disk": fits_disk,
                    "fits": e["peak"] <= budget and host <= host_budget and fits_disk,
                    "stores_units": make_method(cfg.method).stores_units,
                    "note": note,
                }
            )
    return rows


def _disk_free(offload_dir) -> int | None:
    """Free bytes where the units would go (offload_dir), None when unset or not on this machine (not checked)."""
    if offload_dir is None:
        return None
    import shutil

    p = Path(str(offload_dir)).expanduser()
    return shutil.disk_usage(p).free if p.is_dir() else None


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def plan_markdown(rows: list[dict]) -> str:
    cols = ["model", "method", "task", "length", "samples", "tokens", "device", "dtype", "weights GiB",
            "KV device GiB", "KV host GiB", "KV disk GiB", "workspace GiB", "peak GiB", "host GiB", "device fits",
            "host fits", "note"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        vals = [r["model"], r["method"], r["task"], r["length"], r["samples"] or "data", r["tokens"] or "",
                r["device"], r["dtype"], _gib(r["weights"]), _gib(r["kv_device"]), _gib(r["kv_host"]),
                _gib(r["kv_disk"]), _gib(r["workspace"]), _gib(r["peak"]), _gib(r["host"]), _yes(r["fits_device"]),
                _yes(r["fits_host"]), r["note"]]
        lines.append("| " + " | ".join(str(v) for v in vals) + " |")
    n_cells = len({r["cell"] for r in rows})
    total = sum(r["tokens"] for r in rows)
    over = [r for r in rows if not r["fits"]]
    budget = rows[0]["budget"] if rows else 0
    host_budget = rows[0]["host_budget"] if rows else 0
    tail = (f"\n{n_cells} cells, {sum(r['samples'] for r in rows)} samples, {total:,} tokens; budget per cell "
            f"{_gib(budget)} GiB device, {_gib(host_budget)} GiB host")
    if over:
        tail += f"; {len(over)} cell length(s) do not fit: " + ", ".join(
            f"{r['model']}/{r['method']}/{r['task']}@{r['length']} ({_why(r)})" for r in over)
    return "\n".join(lines) + tail + ".\n"


def _yes(fits: bool) -> str:
    return "yes" if fits else "**NO**"


def _why(r: dict) -> str:
    parts = [f"{_gib(r['peak'])} GiB device" if not r["fits_device"] else "",
             f"{_gib(r['host'])} GiB host" + ("; offload_dir=DIR puts its units on disk" if r["stores_units"]
                                              and not r["kv_disk"] else "") if not r["fits_host"] else "",
             f"{_gib(r['kv_disk'])} GiB on disk, {_gib(r['disk_free'] or 0)} GiB free in offload_dir"
             if not r["fits_disk"] else ""]
    return ", ".join(p for p in parts if p)
