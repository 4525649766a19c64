"""`infllm-eval bench`: speed and memory of the context methods, side by side, on one model.

For each length (ascending) and each method (interleaved, so drift in the machine hits all methods alike) one
sample of seeded random token ids is prefilled in `chunk_size` chunks and then `bench.decode_tokens` tokens are
decoded greedily. Measured per (method, length):

- prefill throughput (tokens/s) and decode latency per token (ms), clocks read after a device sync;
- peak host memory (RSS sampled every 5 ms during the measurement) and its growth over the RSS before the
  prefill; peak device memory on CUDA;
- K/V bytes the method holds on the compute device and offloaded to host memory (`method.kv_bytes`), and the
  workspace = peak growth - K/V bytes (what is neither weights nor stored K/V);
- useful FLOPs: the linear layers (q/k/v/o projections and MLP, 2 FLOPs per weight per token; the LM head only
  where logits are needed) plus the attention the method computes (4 * heads * head_dim FLOPs per attended key,
  `method.attended_keys`), divided by the time, and compared with this machine's matmul peak measured in the same
  run (best of several `bench.peak_matmul_size`^3 matmuls in the model dtype, measured before the cells and again
  in every cell after its warm-up and after its measurement; the best of all is the run's one denominator), so
  the ratio holds on any machine; `cell_mfu` divides by the best of the cell's own two measurements instead,
  which follows a shared machine whose speed drifts between cells (never below `mfu`);
- the last prefill chunk alone (`last_chunk_tok_s`, `last_chunk_mfu`): the per-token cost at that length once
  the method's memory has filled, where the whole-prompt figure also averages over the cheaper first chunks.

With `bench.peer` a `peer` row joins each length: the transformers model's own forward (SDPA, DynamicCache, same
chunks; `Peer`), what users would run instead, measured by the same code as the methods.

Every (method, length) cell runs in a fresh process (so peak memory is its own) after an untimed warm-up prefill
of `bench.warmup_tokens`. A (method, length) whose K/V, as the method estimates it (`memory_model`), would not fit
in `bench.memory_fraction` of the available memory is recorded as `skipped` with the estimate. Results go to
`<bench.output_dir>/bench.csv` (tidy, one row per method x length), `bench.md`, and two PNG plots; with
`bench.prompt_build_length` > 0 also the time to build one passkey prompt of that many tokens (`prompt_build.csv`).
"""

from __future__ import annotations

import gc
import json
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import torch
from omegaconf import DictConfig, OmegaConf

from infllm_eval.config import check_runnable, compose, offload_dir
from infllm_eval.engine import Engine
from infllm_eval.errors import UserError
from infllm_eval.methods import make_method
from infllm_eval.models import load_model
from infllm_eval.store import device_name, provenance, to_markdown


class RssPeak:
    """Samples this process's RSS in a thread; `peak` is the highest value seen between start and stop."""

    def __init__(self, every_s: float = 0.005):
        self.proc, self.every_s, self.peak = psutil.Process(), every_s, 0
        self._stop = threading.Event()

    def __enter__(self) -> "RssPeak":
        self.peak = self.proc.memory_info().rss
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.every_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int, reps: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul on this device and dtype (2 n^3 FLOPs each)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def linear_flops_per_token(model) -> int:
    """2 FLOPs per weight of every Linear inside the decoder layers (projections and MLP)."""
    return 2 * sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))


def useful_flops(engine: Engine, start: int, n: int, with_lm_head: int) -> float:
    """FLOPs of processing positions start..start+n-1: linear layers + the attention the method computes."""
    s = engine.spec
    per_key = 4 * s.n_heads * s.head_dim  # per layer
    keys = sum(len(layers) * sum(impl.attended_keys(p) for p in range(start, start + n))
               for impl, layers in engine.attention_groups())
    head = 2 * engine.model.lm_head.weight.numel() * with_lm_head
    return linear_flops_per_token(engine.model) * n + per_key * keys + head


def kv_need_bytes(engine: Engine, length: int, chunk_size: int) -> int:
    """The K/V the method says it keeps at `length` tokens (`memory_model`) in the memory this run measures: the
    device's, plus host memory on CPU, where the two are one."""
    from infllm_eval.commands.plan import kv_bytes_model

    s, total, cpu = engine.spec, 0, engine.device.type == "cpu"
    for impl, layers in engine.attention_groups():
        mem = impl.memory_model(length, min(chunk_size, length), engine.device.type)
        kv = kv_bytes_model(mem, len(layers), s.n_heads, s.n_kv_heads, s.head_dim, torch.finfo(s.dtype).bits // 8,
                            s.offload_dir is not None)
        total += kv["device"] + (kv["host"] if cpu else 0)
    return total


def _measure(engine: Engine, ids: torch.Tensor, chunk_size: int, decode_tokens: int) -> dict:
    dev = engine.device
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    rss0 = psutil.Process().memory_info().rss
    with RssPeak() as rss:
        states = engine.new_states()
        _sync(dev)
        laps = []  # (start, end, clock) after each prefill chunk

        def lap(st: int, ed: int) -> None:
            _sync(dev)
            laps.append((st, ed, time.perf_counter()))

        t0 = time.perf_counter()
        logits = engine.prefill(states, ids, chunk_size, on_chunk=lap)
        _sync(dev)
        t1 = time.perf_counter()
        n = ids.numel()
        step_s = []
        for i in range(decode_tokens):
            nxt = torch.argmax(logits).view(1, 1)
            _sync(dev)
            t = time.perf_counter()
            logits = engine.forward(states, nxt, n + i, logits=True)
            _sync(dev)
            step_s.append(time.perf_counter() - t)
    kv = {"device": 0, "offloaded": 0}
    for impl, layers in ([(engine, None)] if isinstance(engine, Peer) else engine.attention_groups()):
        for where, b in impl.kv_bytes(states if layers is None else [states[i] for i in layers]).items():
            kv[where] += b
    del states
    prefill_s = t1 - t0
    flops = useful_flops(engine, 0, n, with_lm_head=1)
    row = {
        "prefill_s": round(prefill_s, 3),
        "prefill_tok_s": round(n / prefill_s, 1),
        "decode_ms_per_token": round(1000 * sum(step_s) / len(step_s), 2) if step_s else None,
        "peak_host_mb": round(rss.peak / 2**20, 1),
        "host_growth_mb": round((rss.peak - rss0) / 2**20, 1),
        "kv_device_mb": round(kv["device"] / 2**20, 1),
        "kv_offloaded_mb": round(kv["offloaded"] / 2**20, 1),
        "workspace_mb": round((rss.peak - rss0 - kv["device"] - kv["offloaded"]) / 2**20, 1)
        if dev.type == "cpu" else None,
        "peak_device_mb": round(torch.cuda.max_memory_allocated(dev) / 2**20, 1) if dev.type == "cuda" else None,
        "useful_gflop": round(flops / 1e9, 4),
        "useful_gflop_s": round(flops / prefill_s / 1e9, 2),
    }
    if laps:  # the last chunk alone: the per-token cost at this length, once the method's memory is filled
        st, ed, t_end = laps[-1]
        sec = t_end - (laps[-2][2] if len(laps) > 1 else t0)
        row["last_chunk_tokens"] = ed - st
        row["last_chunk_tok_s"] = round((ed - st) / sec, 1)
        row["last_chunk_useful_gflop_s"] = round(useful_flops(engine, st, ed - st, with_lm_head=0) / sec / 1e9, 2)
    return row


SUMMARY_COLUMNS = ("prefill_tok_s", "decode_ms_per_token", "peak_host_mb", "workspace_mb", "mfu", "cell_mfu",
                   "last_chunk_tok_s", "last_chunk_mfu")


def summarize_repeats(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, length) over the finished repeats: n, and median / min / max of the main columns."""
    ok = df[df.status == "ok"]
    out = []
    for (method, length), g in ok.groupby(["method", "length"], sort=False):
        row = {"method": method, "length": length, "n": len(g)}
        for c in SUMMARY_COLUMNS:
            if c in g and g[c].notna().any():
                row[c] = round(float(g[c].median()), 4)
                row[f"{c}_min"], row[f"{c}_max"] = round(float(g[c].min()), 4), round(float(g[c].max()), 4)
        out.append(row)
    return pd.DataFrame(out)


def _plot(df: pd.DataFrame, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = df[df.status == "ok"]
    paths = []
    for col, label, name in [("prefill_tok_s", "prefill tokens/s", "bench_throughput.png"),
                             ("peak_host_mb", "peak host memory (MB)", "bench_memory.png")]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, g in ok.groupby("method"):
            med = g.groupby("length")[col].median()  # with bench.repeats > 1: the median per length
            ax.plot(med.index, med.values, marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.set_title(f"{df['model'].iloc[0]} on {df['device'].iloc[0]}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        paths.append(out / name)
    return paths


def warm_up(eng: Engine, cfg: DictConfig) -> None:
    """The untimed warm-up before a measurement: `bench.warmup_tokens` seeded random ids prefilled in `chunk_size`
    chunks with fresh states (probes/memory_probe.py and probes/time_parts.py use it too)."""
    vocab = eng.model.config.vocab_size
    warm = torch.randint(0, vocab, (int(cfg.bench.warmup_tokens),), generator=torch.Generator().manual_seed(1))
    eng.prefill(eng.new_states(), warm, int(cfg.chunk_size))


def _is_method_override(o: str) -> bool:
    return o.split("=", 1)[0].lstrip("+~").split(".")[0] == "method"


def compose_method(overrides: list[str], method: str) -> DictConfig:
    """The config of one bench method: the overrides (`run_bench` refused any `method=` in them) with
    `method=<method>`, so `method.params.*` overrides apply to it. PEER: full attention's config without the
    method overrides (the peer has no method; chunk size, model, dtype and seed are what it shares)."""
    if method == PEER:
        return compose([*(o for o in overrides if not _is_method_override(o)), "method=full"])
    try:
        return compose([*overrides, f"method={method}"])
    except UserError as e:
        if not any(_is_method_override(o) and not o.startswith("method=") for o in overrides):
            raise
        raise UserError(f"bench.methods includes {method!r}, which does not take this override ({e}); bench it "
                        f"without the override, or list in bench.methods only methods that take it.") from e


#: the name of the `bench.peer` rows: the transformers model's own forward, no harness engine
PEER = "peer"


class Peer:
    """What a user would run instead of the harness: the transformers model's own forward with its SDPA attention
    and its DynamicCache, prefilling in the same `chunk_size` chunks (the LM head on the last position of each
    call only: `logits_to_keep=1`), then decoding one token per call. It offers the part of the Engine interface
    `_measure` uses, so the peer rows are measured by the same code as the methods' rows; its work is counted as
    full attention's (`attention_groups`: every layer attends to every earlier key; a model with sliding-window
    layers computes less, so its peer MFU is an upper bound)."""

    def __init__(self, model, full, device: torch.device, dtype: torch.dtype):
        from infllm_eval.engine import model_spec

        self.model, self.device = model, device
        model.set_attn_implementation("sdpa")
        self.spec = model_spec(model, device, dtype)
        self.full = full
        full.bind(model, self.spec)  # only its attended_keys / memory_model are used

    def attention_groups(self):
        return [(self.full, list(range(self.spec.n_layers)))]

    def new_states(self):
        from transformers import DynamicCache

        return [DynamicCache(config=self.model.config)]

    @torch.no_grad()
    def forward(self, states, ids: torch.Tensor, start: int, logits: bool):
        assert states[0].get_seq_length() == start
        out = self.model(ids.to(self.device), cache=states[0], use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float() if logits else None

    def prefill(self, states, prompt: torch.Tensor, chunk_size: int, deadline=None, on_chunk=None):
        ids = prompt.view(1, -1)
        n = ids.shape[1]
        for st in range(0, n - 1, chunk_size):
            self.forward(states, ids[:, st : min(st + chunk_size, n - 1)], st, logits=False)
            if on_chunk is not None:
                on_chunk(st, min(st + chunk_size, n - 1))
        return self.forward(states, ids[:, n - 1 :], n - 1, logits=True)

    def kv_bytes(self, states) -> dict[str, int]:
        from infllm_eval.methods.base import stored_bytes

        return {"device": stored_bytes(states[0]), "offloaded": 0}


def _cell(overrides: list[str], method: str, length: int, results) -> None:
    """One (method, length) measurement in a fresh process, so its peak memory is its own. `method` PEER: the
    transformers forward (`Peer`), with full attention's config for chunk size, seed and its work count."""
    try:
        cfg = compose_method(overrides, method)
        b = cfg.bench
        lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        if method == PEER:
            eng = Peer(lm.model, make_method(cfg.method), lm.device, lm.dtype)
        else:
            m = make_method(cfg.method)
            eng = Engine(lm.model, m, lm.device, lm.dtype, local_layers=str(cfg.local_layers),
                         offload_dir=offload_dir(cfg) if m.stores_units else None)
        vocab = lm.model.config.vocab_size
        warm_up(eng, cfg)
        cell_peak = matmul_peak_flops(lm.device, lm.dtype, int(b.peak_matmul_size))
        avail = psutil.virtual_memory().available if lm.device.type == "cpu" else torch.cuda.mem_get_info(lm.device)[0]
        need = kv_need_bytes(eng, length, int(cfg.chunk_size))
        row = {"device": device_name(lm.device), "dtype": str(lm.dtype).replace("torch.", ""),
               "chunk_size": int(cfg.chunk_size),
               "attention_backend": "transformers sdpa" if method == PEER else
               eng.method.attention_backend(lm.device, lm.dtype),
               "cell_peak_gflop_s": round(cell_peak / 1e9, 3), "status": "ok"}
        if need > float(b.memory_fraction) * avail:
            row["status"] = f"skipped: K/V needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
        else:
            ids = torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(int(cfg.seed) + length))
            row.update(_measure(eng, ids, int(cfg.chunk_size), int(b.decode_tokens)))
            # probed again right after: the cell's peak is the better of the two measurements around its prefill
            cell_peak = max(cell_peak, matmul_peak_flops(lm.device, lm.dtype, int(b.peak_matmul_size)))
            row["cell_peak_gflop_s"] = round(cell_peak / 1e9, 3)
            row["cell_mfu"] = round(row["useful_gflop_s"] / row["cell_peak_gflop_s"], 5)
    except (torch.OutOfMemoryError, MemoryError) as e:
        row = {"status": f"oom: {str(e)[:200]}"}
    except Exception as e:  # noqa: BLE001 - recorded, the benchmark goes on
        row = {"status": f"error: {type(e).__name__}: {str(e)[:300]}"}
    results.put(row)


def _run_isolated(overrides: list[str], method: str, length: int) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_cell, args=(overrides, method, length, q))
    p.start()
    p.join()
    if not q.empty():
        return q.get()
    return {"status": f"error: the measuring process died (exit code {p.exitcode}; killed for memory?)"}


def prompt_build_seconds(cfg: DictConfig, length: int) -> dict:
    """Seconds to build one passkey prompt of `length` tokens with the model's tokenizer (best of 3, after the
    task's one-time setup), and how far its ids are from the target."""
    from infllm_eval.tasks import make_task
    from infllm_eval.tasks.synthetic import load_tokenizer

    task_cfg = {**OmegaConf.to_container(compose(["task=passkey"]).task, resolve=True),
                "lengths": [length], "depths": [0.5], "samples": 1}
    task = make_task(task_cfg, load_tokenizer(cfg.model), lambda t: t, answer_prefix=bool(cfg.model.answer_prefix),
                     seed=0)
    spec = task.sample_specs()[0]
    best, n = float("inf"), 0
    for _ in range(3):
        t = time.perf_counter()
        n = int(task.build(spec).input_ids.numel())
        best = min(best, time.perf_counter() - t)
    return {"model": cfg.model.name, "length": length, "n_tokens": n, "build_s": round(best, 4)}


def run_bench(overrides: list[str], on_row=None) -> tuple[pd.DataFrame, Path]:
    """Runs the benchmark described by `bench.*` in the composed config; returns the table and its folder.
    Every (method, length) cell runs in a fresh process. Cells run repeat by repeat, each repeat a full sweep
    (lengths in order, methods interleaved per length): drift in the machine's speed then hits every method and
    every length alike, so ratios between lengths hold as well as ratios between methods, and the first sweep is
    complete before any repeat starts."""
    chosen = [o for o in overrides if o.lstrip("+~").startswith("method=")]
    if chosen:  # never a silent no-op: the benched methods are bench.methods'
        raise UserError(f"bench takes its methods from bench.methods, not {chosen[0]!r}; write "
                        f"bench.methods=[{chosen[0].partition('=')[2]}].")
    probe = compose([o for o in overrides if not _is_method_override(o)])  # method overrides need a method
    check_runnable(probe)  # bench.* are validated with the rest of the config (config.validate)
    b = probe.bench
    methods = list(b.methods)
    lengths = sorted(int(x) for x in b.lengths)
    cfgs = {m: compose_method(overrides, m) for m in methods}
    if b.peer:  # the transformers forward, interleaved with the methods like one of them
        cfgs[PEER] = compose_method(overrides, PEER)
        methods.append(PEER)
    for cfg in cfgs.values():  # every method validated before any weights load
        make_method(cfg.method)
    if probe.get("offload_dir") is not None and not any(make_method(cfgs[m].method).stores_units for m in methods):
        raise UserError("offload_dir is set, but none of bench.methods keeps memory units for it to hold "
                        "(only infllm does); unset offload_dir or bench infllm.")
    base = cfgs[methods[0]]  # model, device, seed and the written config; its method node is the first method's
    out = Path(b.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    from infllm_eval.models import resolve_device_dtype

    device, dtype = resolve_device_dtype(base.device, base.dtype)
    # which code and machine produced the figures (git commit + dirty flag, package versions, device)
    (out / "provenance.json").write_text(json.dumps(provenance(device, int(base.seed)), indent=2), encoding="utf-8")
    peak = matmul_peak_flops(device, dtype, int(b.peak_matmul_size)) / 1e9
    rows = []
    cells = [(length, rep, m) for rep in range(int(b.repeats)) for length in lengths for m in methods]
    for length, rep, m in cells:
        row = {"model": base.model.name, "method": m, "length": length, "repeat": rep,
               "device": device_name(device)}
        row.update(_run_isolated(list(overrides), m, length))
        rows.append(row)
        # one denominator for the whole run: the best matmul measured so far (here, and in every cell after
        # its warm-up), so a moment of lower clock or a noisy neighbour cannot inflate one row's MFU
        peak = round(max([peak] + [r.get("cell_peak_gflop_s") or 0 for r in rows]), 3)
        for r in rows:
            r["peak_matmul_gflop_s"] = peak
            if "useful_gflop_s" in r:
                r["mfu"] = round(r["useful_gflop_s"] / peak, 5)
            if "last_chunk_useful_gflop_s" in r:
                r["last_chunk_mfu"] = round(r["last_chunk_useful_gflop_s"] / peak, 5)
        if on_row:
            on_row(row)
        pd.DataFrame(rows).to_csv(out / "bench.csv", index=False)  # flushed after every cell
    df = pd.DataFrame(rows)
    md = to_markdown(df)
    if int(b.repeats) > 1:
        summary = summarize_repeats(df)
        summary.to_csv(out / "bench_summary.csv", index=False)
        md += "\nMedian, min and max over the repeats:\n\n" + to_markdown(summary)
    if int(b.prompt_build_length) > 0:
        pb = prompt_build_seconds(base, int(b.prompt_build_length))
        pd.DataFrame([pb]).to_csv(out / "prompt_build.csv", index=False)
        md += (f"\nBuilding one passkey prompt of {pb['length']:,} tokens ({base.model.name}'s tokenizer): "
               f"{pb['build_s']} s, {pb['n_tokens']:,} ids.\n")
    (out / "bench.md").write_text(md, encoding="utf-8")
    (out / "config.yaml").write_text(OmegaConf.to_yaml(base), encoding="utf-8")
    _plot(df, out)
    return df, out

