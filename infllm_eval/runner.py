"""One cell of the grid: config -> model + method + task -> engine -> per-sample records -> store -> summary."""

from __future__ import annotations

import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from infllm_eval import __version__
from infllm_eval.config import check_output_dir, parse_shard, recorded_invocation, resolved_yaml
from infllm_eval.engine import Engine, SampleTimeout
from infllm_eval.methods import make_method
from infllm_eval.metrics import get_metric
from infllm_eval.models import load_model, render_chat
from infllm_eval.store import RunStore, content_key, provenance, run_dir_name
from infllm_eval.tasks import make_task
from infllm_eval.tasks.base import SampleSkipped

console = Console(stderr=True)


@dataclass(frozen=True)
class RunTarget:
    """Where a run writes and which samples it runs: computed once per run (`run_target`) and passed down."""

    dir: Path
    shard: tuple[int, int] | None  # (i, n): every n-th sample starting at i; None = all samples


def run_target(cfg: DictConfig) -> RunTarget:
    """output_dir/run_name; shard i/n (`shard=i/n`) writes its own directory: run_name-shard{i}of{n}."""
    shard = parse_shard(cfg.get("shard"))
    return RunTarget(Path(cfg.output_dir) / run_dir_name(cfg.run_name, shard), shard)


def run_dir_of(cfg: DictConfig) -> Path:
    """The run directory of `cfg` (see `run_target`)."""
    return run_target(cfg).dir


def run_cell(cfg: DictConfig, target: RunTarget | None = None) -> pd.DataFrame:
    """Runs (or resumes) one model x method x task cell and returns its tidy summary; `target` is
    `run_target(cfg)` when the caller has computed it already."""
    method = make_method(cfg.method)  # validates parameters before any weights load
    target = run_target(cfg) if target is None else target
    check_output_dir(target.dir)
    lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    render = (lambda text: render_chat(lm, text)) if cfg.model.chat_template else (lambda text: text)
    task = make_task(cfg.task, lm.tokenizer, render, answer_prefix=bool(cfg.model.answer_prefix), seed=cfg.seed)
    metric = get_metric(task.metric)
    engine = Engine(lm.model, method, lm.device, lm.dtype)
    stop_ids = list(lm.stop_token_ids) + list(getattr(task, "extra_stop_token_ids", []) or [])

    gen = {"max_new_tokens": task.max_new_tokens, "chunk_size": cfg.chunk_size, "greedy": True}
    base_key = {
        "harness": __version__, "model": lm.fingerprint, "method": method.describe(),
        "task": task.data_fingerprint(), "generation": gen, "dtype": str(lm.dtype), "device": lm.device.type,
    }
    specs = task.sample_specs()
    if target.shard:
        specs = specs[target.shard[0] :: target.shard[1]]
    timeout_s = cfg.get("sample_timeout_s")
    cell_key = content_key(base_key)  # names the config the records belong to (report reads only these)
    with RunStore(target.dir) as store:
        store.start(resolved_yaml(cfg), provenance(lm.device, cfg.seed, model_fingerprint=lm.fingerprint,
                                                   task_fingerprint=base_key["task"], method=method.describe(),
                                                   generation=gen, dtype=base_key["dtype"],
                                                   attention_backend=method.attention_backend(lm.device, lm.dtype),
                                                   cell_key=cell_key, invocation=recorded_invocation(cfg)))
        done = store.finished() if cfg.resume else {}
        records = []
        ids = {"model": cfg.model.name, "method": cfg.method.name, "task": cfg.task.name}
        bar = _progress() if cfg.progress else nullcontext()
        with bar as progress:
            job = progress.add_task(ids["task"], total=len(specs), length="") if progress else None
            for spec in specs:
                key = content_key(base_key, spec["sample_id"])
                if progress:
                    progress.update(job, length=f"L={spec.get('length')}")
                if key in done:
                    records.append(done[key])
                else:
                    rec = _run_sample(engine, task, metric, spec, stop_ids, lm.tokenizer, cfg.chunk_size,
                                      timeout_s)
                    rec.update(ids, key=key, cell_key=cell_key)
                    store.append(rec)
                    records.append(rec)
                if progress:
                    progress.advance(job)
        summary = store.write_summary(records)
    return summary


def _run_sample(engine, task, metric, spec, stop_ids, tokenizer, chunk_size, timeout_s=None) -> dict:
    rec = {"sample_id": spec["sample_id"], "length": spec.get("length"), "depth": spec.get("depth"),
           "n_input_tokens": None, "truncated": False, "n_dropped": 0, "prediction": None, "answers": None,
           "score": None, "status": "ok", "error": None, "prefill_s": None, "decode_s": None,
           "new_tokens": 0, "stopped_by": None, "peak_mem_bytes": None, "finished_at": None}
    t_start = time.perf_counter()
    try:
        sample = task.build(spec)
        rec.update(n_input_tokens=sample.n_input_tokens, truncated=sample.truncated, n_dropped=sample.n_dropped,
                   answers=sample.answers, meta=sample.meta,
                   score_fields=sample.score_fields or None)
        g = engine.generate(sample.input_ids, task.max_new_tokens, chunk_size, stop_ids, timeout_s=timeout_s)
        pred = tokenizer.decode(g.tokens, skip_special_tokens=False)
        rec.update(prediction=pred, score=float(metric(pred, sample.answers, **sample.score_fields)),
                   prefill_s=round(g.prefill_s, 4), decode_s=round(g.decode_s, 4), new_tokens=len(g.tokens), stopped_by=g.stopped_by,
                   peak_mem_bytes=g.peak_mem_bytes)
    except SampleSkipped as e:  # truncation=skip and the prompt does not fit: recorded, never scored
        rec.update(status="skipped", error=str(e))
    except SampleTimeout as e:
        rec.update(status="timeout", error=f"{e} ({timeout_s} s)")
    except (torch.OutOfMemoryError, MemoryError) as e:
        rec.update(status="oom", error=f"{type(e).__name__}: {str(e)[:500]}")
    except Exception as e:  # one failing sample is recorded and the run goes on
        rec.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=8))
    # wall time of the whole sample (build, prefill, decode, scoring): wall_s - prefill_s - decode_s is the
    # harness's own overhead
    rec["wall_s"] = round(time.perf_counter() - t_start, 4)
    rec["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return rec


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), TextColumn("{task.fields[length]}"), BarColumn(),
        MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
    )
