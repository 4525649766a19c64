"""One cell of the grid: config -> model + method + task -> engine -> per-sample records -> store -> summary."""

from __future__ import annotations

import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
from infllm_eval.config import check_output_dir, offload_dir, parse_shard, recorded_invocation, resolved_yaml
from infllm_eval.engine import Engine, SampleTimeout
from infllm_eval.errors import UserError
from infllm_eval.methods import ContextMethod, make_method
from infllm_eval.metrics import get_metric
from infllm_eval.layout import layer_plan
from infllm_eval.models import check_method_on_model, load_model, load_tokenizer, render_prompt, resolve_device_dtype
from infllm_eval.store import (LOCK_FILE, SAMPLES_FILE, RunStore, content_key, provenance, read_samples,
                               run_dir_name)
from infllm_eval.tasks import as_plain_dict, make_task
from infllm_eval.tasks.base import SampleSkipped, Task

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
    `run_target(cfg)` when the caller has computed it already.

    Order: everything that can be checked without the weights (`prepare_cell`: method, device, dtype, model
    config and tokenizer, the task with its data and lengths, memory) before anything is written; then the run
    directory and its lock (a second process is refused at once); then the existing records are read (a resume
    that cannot read them is refused before anything changes); then the weights. A failure before the first
    write removes the directories this call created, and nothing else."""
    target = run_target(cfg) if target is None else target
    cell = prepare_cell(cfg, target)
    say = _Feedback(bool(cfg.progress))
    created = _first_missing(target.dir)
    state = {"saved": 0, "new": 0, "started": False, "keys": set()}
    try:
        with _sigterm_interrupts():
            check_output_dir(target.dir)
            with RunStore(target.dir) as store:
                store.check_records()
                lm = _load_weights(cfg, say)
                return _run(cfg, cell, lm, store, target, say, state)
    except KeyboardInterrupt:
        _remove_if_empty(target.dir, created)
        _say_interrupted(target.dir, state)
        raise
    except BaseException:
        _remove_if_empty(target.dir, created)
        raise


@dataclass
class Cell:
    """What `prepare_cell` checked and built before anything is written: the method, the task, its metric,
    the samples this run (or shard) runs."""

    method: ContextMethod
    task: Task
    metric: Callable
    specs: list[dict]


def prepare_cell(cfg: DictConfig, target: RunTarget) -> Cell:
    """Every check that needs no weights, in the order a user fixes them; writes nothing."""
    method = make_method(cfg.method)  # validates parameters
    method.check_chunk_size(int(cfg.chunk_size))
    device, _ = resolve_device_dtype(cfg.device, cfg.dtype)
    method.check_offload_dir(offload_dir(cfg), device.type)
    tokenizer = load_tokenizer(cfg.model)  # model config, model.path / hub cache, architecture
    # the model's rope scaling vs the method's positions; local_layers vs the model's layout
    check_method_on_model(method, cfg.model, tokenizer, str(cfg.local_layers))
    model_cfg = as_plain_dict(cfg.model)
    render = (lambda text: render_prompt(model_cfg, tokenizer, text)) if cfg.model.chat_template else (lambda t: t)
    # the task with its data (task.data_dir) and its lengths (too short for the prompt, over the task's maximum)
    task = make_task(cfg.task, tokenizer, render, answer_prefix=bool(cfg.model.answer_prefix), seed=cfg.seed)
    metric = get_metric(task.metric)
    specs = task.sample_specs()
    if target.shard:
        specs = specs[target.shard[0] :: target.shard[1]]
    if not specs:
        raise UserError(f"shard={cfg.shard} selects none of the task's {len(task.sample_specs())} samples; "
                        "use fewer shards.")
    _check_memory(cfg, specs, device)
    return Cell(method, task, metric, specs)


def _check_memory(cfg: DictConfig, specs: list[dict], device: torch.device) -> None:
    """Refuses a cell whose longest length `plan` estimates over the memory budget (the same estimate and
    budget: `commands.plan.estimate`, `budget_bytes`), unless allow_over_budget=true. Tasks whose prompt
    lengths are known only once built (benchmark rows) and models without a shape are not estimated."""
    from infllm_eval.commands.plan import GIB, budget_bytes, estimate

    if not isinstance(cfg.allow_over_budget, bool):
        raise UserError(f"allow_over_budget must be true or false, got {cfg.allow_over_budget!r}.")
    longest = max(int(s.get("length") or 0) for s in specs)
    if not longest or cfg.allow_over_budget:
        return
    try:
        peak = estimate(cfg, longest, device.type)["peak"]
    except UserError:  # no shape to estimate from: `plan` says so; the run does not need one
        return
    budget = budget_bytes(None, device.type)
    if peak > budget:
        raise UserError(
            f"{cfg.method.name} at {longest:,} tokens needs about {peak / GIB:.1f} GiB by `infllm-eval plan`'s "
            f"estimate, over the {budget / GIB:.1f} GiB budget of this {device.type} (plan.budget_gb in "
            "conf/tools.yaml, else its memory); lower task.lengths, pick a method that keeps less, or set "
            "allow_over_budget=true to run anyway."
        )


def _load_weights(cfg: DictConfig, say: "_Feedback"):
    say.line(f"loading model {cfg.model.name} ({cfg.device}, {cfg.dtype}) ...")
    t0 = time.perf_counter()
    lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    say.line(f"model {cfg.model.name} loaded on {lm.device} ({str(lm.dtype).removeprefix('torch.')}) "
             f"in {time.perf_counter() - t0:.1f} s")
    return lm


def _run(cfg: DictConfig, cell: Cell, lm, store: RunStore, target: RunTarget, say: "_Feedback",
         state: dict) -> pd.DataFrame:
    method, task, specs = cell.method, cell.task, cell.specs
    engine = Engine(lm.model, method, lm.device, lm.dtype, local_layers=str(cfg.local_layers),
                    offload_dir=offload_dir(cfg))
    stop_ids = list(lm.stop_token_ids) + list(getattr(task, "extra_stop_token_ids", []) or [])
    gen = {"max_new_tokens": task.max_new_tokens, "chunk_size": cfg.chunk_size, "greedy": True}
    base_key = {
        "harness": __version__, "model": lm.fingerprint, "method": method.describe(),
        "task": task.data_fingerprint(), "generation": gen, "dtype": str(lm.dtype), "device": lm.device.type,
    }
    if engine.layout.local_layers:  # only mixed layouts: the keys of every other model's records stay as they were
        base_key["local_layers"] = str(cfg.local_layers)
    timeout_s = cfg.get("sample_timeout_s")
    cell_key = content_key(base_key)  # names the config the records belong to (report reads only these)
    keys = [content_key(base_key, spec["sample_id"]) for spec in specs]
    state.update(started=True, keys=set(keys))
    with _writing(target.dir, state):
        store.start(resolved_yaml(cfg), provenance(lm.device, cfg.seed, model_fingerprint=lm.fingerprint,
                                                   task_fingerprint=base_key["task"], method=method.describe(),
                                                   generation=gen, dtype=base_key["dtype"],
                                                   attention_backend=method.attention_backend(lm.device, lm.dtype),
                                                   cell_key=cell_key, invocation=recorded_invocation(cfg),
                                                   layers=layer_plan(engine.layout.layer_types,
                                                                     engine.layout.sliding_window,
                                                                     str(cfg.local_layers), cfg.method.name)))
    done = store.finished() if cfg.resume else {}
    state["saved"] = sum(k in done for k in keys)
    if state["saved"]:
        say.line(f"resuming: {state['saved']} of {len(specs)} samples finished before are reused")
    by_key = {}
    ids = {"model": cfg.model.name, "method": cfg.method.name, "task": cfg.task.name}
    pending = [(spec, key) for spec, key in zip(specs, keys) if key not in done]
    plan = PrefixPlan.of(task, [spec for spec, _ in pending], int(cfg.chunk_size)) if cfg.prefix_reuse else None
    with say.bar(ids["task"], len(specs)) as tick:
        for spec, key in zip(specs, keys):
            if key in done:
                by_key[key] = done[key]
                tick(spec, done[key], True)
        for i in (plan.order if plan else range(len(pending))):
            spec, key = pending[i]
            rec = _run_sample(engine, task, cell.metric, spec, stop_ids, lm.tokenizer, cfg.chunk_size,
                              timeout_s, say.prefill_progress(spec), **(plan.run_args(i) if plan else {}))
            rec.update(ids, key=key, cell_key=cell_key)
            with _writing(target.dir, state):
                store.append(rec)
            state["new"] += rec["status"] == "ok"
            by_key[key] = rec
            tick(spec, rec, False)
    with _writing(target.dir, state):
        return store.write_summary([by_key[k] for k in keys])


class PrefixPlan:
    """`prefix_reuse`: the samples of a cell whose prompts start alike (a passkey grid: everything before the
    needle) prefill their common start once. One sample, the trunk (the one sharing the most prompt with the
    others), runs first and keeps the method's states after each chunk that ends where another sample's prompt
    parts from it (`Engine.snapshot`, only at chunk boundaries: the resumed samples cut the same chunks a fresh
    prefill cuts, so their outputs are identical); the others then resume from those states, longest shared
    prefix first (so storage that only grows can be rewound). A sample's record says how many prompt tokens it
    reused (`prefix_reused_tokens`; its prefill_s counts the rest). Prompts are compared as token ids, never
    assumed: a sample that shares less than one chunk with the trunk runs alone."""

    #: samples compared pairwise to choose the trunk (a larger cell is planned in groups of this many)
    GROUP = 64

    def __init__(self, order: list[int], resume_at: dict[int, tuple[int, int]],
                 trunks: dict[int, tuple[int, ...]],
                 samples: dict):
        self.order, self.resume_at, self.trunks, self.samples = order, resume_at, trunks, samples
        self.snapshots: dict[int, dict] = {}  # per trunk: chunk end -> snapshot

    @classmethod
    def of(cls, task, specs: list[dict], chunk: int) -> "PrefixPlan":
        import numpy as np

        samples = {}
        for i, spec in enumerate(specs):
            try:
                samples[i] = task.build(spec)
            except Exception:  # noqa: BLE001 - the sample's own run records why it fails
                pass
        order, resume_at, trunks = [], {}, {}
        for g0 in range(0, len(specs), cls.GROUP):
            group = [i for i in range(g0, min(len(specs), g0 + cls.GROUP)) if i in samples]
            ids = {i: samples[i].input_ids.view(-1).numpy() for i in group}

            def lcp(a, b) -> int:
                m = min(len(a), len(b))
                diff = np.flatnonzero(a[:m] != b[:m])
                return int(diff[0]) if len(diff) else m

            shared = {i: {} for i in group}
            for x, i in enumerate(group):  # each pair once: the shared start is symmetric
                for j in group[x + 1 :]:
                    shared[i][j] = shared[j][i] = lcp(ids[i], ids[j])
            trunk = max(group, key=lambda i: sum(shared[i].values()), default=None)
            at = {}
            for j in group:
                if j != trunk:
                    c = min(shared[trunk][j], len(ids[j]) - 1, len(ids[trunk]) - 1) // chunk * chunk
                    if c > 0:
                        at[j] = c
            if trunk is not None:
                order.append(trunk)
                trunks[trunk] = tuple(sorted(set(at.values())))
                resume_at.update({j: (trunk, c) for j, c in at.items()})
            order += sorted(at, key=lambda j: -at[j]) + [j for j in group if j != trunk and j not in at]
        order += [i for i in range(len(specs)) if i not in samples]
        return cls(order, resume_at, trunks, samples)

    def run_args(self, i: int) -> dict:
        """`_run_sample`'s keyword arguments for pending sample i: its built sample, what it resumes from, and (for
        a trunk) where to keep snapshots."""
        args = {"sample": self.samples.get(i)}
        if i in self.trunks:
            self.snapshots[i] = {}
            args.update(snapshot_at=self.trunks[i], snapshots=self.snapshots[i])
        if i in self.resume_at:
            trunk, c = self.resume_at[i]
            snap = self.snapshots.get(trunk, {}).get(c)
            if snap is not None:  # (a trunk that failed before position c kept none: the sample runs alone)
                args["resume"] = (c, snap)
            for later in [p for p in self.snapshots.get(trunk, {}) if p > c]:
                del self.snapshots[trunk][later]  # longest first: no later sample needs them
        return args


@contextmanager
def _writing(run_dir: Path, state: dict):
    """A write to the run directory that fails (disk full, quota, folder removed) is one sentence saying what
    is kept, not a traceback."""
    try:
        yield
    except OSError as e:
        raise UserError(f"Cannot write to '{run_dir}' ({e.strerror or e}); {state['saved'] + state['new']} finished "
                        "samples were saved before it: fix that (free space?) and run the same command to resume.") from e


@contextmanager
def _sigterm_interrupts():
    """SIGTERM (scancel, a SLURM time limit, `kill`) ends the run as Ctrl-C does: the run says what it kept and
    a start that had written nothing removes its folders. Only where SIGTERM has its default action (a launcher
    such as submitit that handles it keeps its own handler) and only in the main thread."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` (itself included) that does not exist yet: what creating it creates."""
    missing = None
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            break
        missing = p
    return missing


def _remove_if_empty(run_dir: Path, created: Path | None) -> None:
    """Removes the folders this call created (`created` and below, down to `run_dir`) while they hold nothing
    but the lock file: a refused or failed start leaves no empty run directory behind, and nothing that holds
    a record is ever removed."""
    if created is None:
        return
    try:
        if {p.name for p in run_dir.iterdir()} <= {LOCK_FILE}:
            (run_dir / LOCK_FILE).unlink(missing_ok=True)
        for p in (run_dir, *run_dir.parents):
            p.rmdir()  # fails (and stops) at the first folder that is not empty
            if p == created:
                break
    except OSError:
        pass


def _say_interrupted(run_dir: Path, state: dict) -> None:
    """What Ctrl-C kept: the finished samples of this run's keys in samples.jsonl (read back: a record may be
    written and the interrupt arrive before it was counted)."""
    if not state["started"]:
        print(f"interrupted before any sample ran; nothing was written to {run_dir}.", file=sys.stderr, flush=True)
        return
    path = run_dir / SAMPLES_FILE
    ok = {r.get("key") for r in read_samples(path).records if r.get("status") == "ok"}
    kept = len(ok & state["keys"])
    state["new"] = kept - state["saved"]
    print(f"interrupted: {kept} finished samples of this run are saved in {run_dir} ({state['new']} from this "
          "try); run the same command again to resume (finished samples are reused, the rest run).",
          file=sys.stderr, flush=True)


def _run_sample(engine, task, metric, spec, stop_ids, tokenizer, chunk_size, timeout_s=None, progress=None,
                sample=None, resume=None, snapshot_at=(), snapshots=None) -> dict:
    """One sample, recorded whatever happens. `progress(done, total)`, if given, hears the prefill's progress.
    `sample`: the sample already built (prefix reuse), else built here; `resume`, `snapshot_at`, `snapshots`:
    `Engine.generate`'s (`PrefixPlan`)."""
    rec = {"sample_id": spec["sample_id"], "length": spec.get("length"), "depth": spec.get("depth"),
           "n_input_tokens": None, "truncated": False, "n_dropped": 0, "prediction": None, "answers": None,
           "score": None, "status": "ok", "error": None, "prefill_s": None, "decode_s": None,
           "new_tokens": 0, "stopped_by": None, "peak_mem_bytes": None, "finished_at": None}
    t_start = time.perf_counter()
    try:
        sample = task.build(spec) if sample is None else sample
        rec.update(n_input_tokens=sample.n_input_tokens, truncated=sample.truncated, n_dropped=sample.n_dropped,
                   answers=sample.answers, meta=sample.meta,
                   score_fields=sample.score_fields or None)
        total = int(sample.input_ids.numel())
        first = 0 if resume is None else resume[0]
        on_chunk = None if progress is None else (lambda st, end: progress(end, total, first))
        g = engine.generate(sample.input_ids, task.max_new_tokens, chunk_size, stop_ids, timeout_s=timeout_s,
                            on_chunk=on_chunk, resume=resume, snapshot_at=snapshot_at, snapshots=snapshots)
        if resume is not None or snapshot_at:
            rec["prefix_reused_tokens"] = 0 if resume is None else resume[0]
        pred = tokenizer.decode(g.tokens, skip_special_tokens=False)
        rec.update(prediction=pred, score=float(metric(pred, sample.answers, **sample.score_fields)),
                   prefill_s=round(g.prefill_s, 4), decode_s=round(g.decode_s, 4), new_tokens=len(g.tokens), stopped_by=g.stopped_by,
                   peak_mem_bytes=g.peak_mem_bytes)
        if "memory" in g.extra:  # what the method stored and where (InfLLM: units, their bytes, dtype, storage)
            rec["memory"] = g.extra["memory"]
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


class _Feedback:
    """What the user sees while a cell runs (stderr; nothing with progress=false): a line when the model starts
    and finishes loading, then rich's progress bar on a terminal, or one plain line per finished sample when
    stderr is not a terminal (SLURM logs, CI), where a bar would show nothing until the cell ends."""

    #: prefills shorter than this many tokens report no progress of their own (they take seconds)
    PREFILL_PROGRESS_TOKENS = 65536
    #: seconds between two plain progress lines of one prefill (stderr not a terminal)
    PREFILL_LINE_S = 60.0

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._progress: Progress | None = None

    def prefill_progress(self, spec: dict):
        """For a long sample (spec's length >= PREFILL_PROGRESS_TOKENS): a callback `(done, total, first)` for its
        prefill, shown as a second bar with its ETA on a terminal, or as a plain line at most every
        PREFILL_LINE_S seconds (tokens, share, tokens/s, ETA); None otherwise."""
        if not self.enabled or int(spec.get("length") or 0) < self.PREFILL_PROGRESS_TOKENS:
            return None
        t0, last = time.perf_counter(), [0.0]
        name = f"prefill {spec.get('sample_id')}"
        if self.tty and self._progress is not None:
            prog, job = self._progress, [None]

            def bar(done: int, total: int, first: int = 0) -> None:
                if job[0] is None:
                    job[0] = prog.add_task(name, total=total, length="")
                prog.update(job[0], completed=done, length=f"{done:,} tok")
                if done >= total - 1:
                    prog.remove_task(job[0])

            return bar

        def line(done: int, total: int, first: int = 0) -> None:
            """`first`: tokens reused from another sample's prefix (prefix_reuse), not prefilled here."""
            now = time.perf_counter() - t0
            if now - last[0] < self.PREFILL_LINE_S and done < total - 1:
                return
            last[0] = now
            rate = (done - first) / now if now > 0 else 0.0
            eta = (total - done) / rate if rate > 0 else float("nan")
            print(f"  {name}: {done:,} / {total:,} tokens prefilled ({100 * done / total:.1f} %, {rate:.0f} tok/s, "
                  f"{now:.0f} s, ETA {eta:.0f} s)", file=sys.stderr, flush=True)

        return line

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    @contextmanager
    def bar(self, name: str, total: int):
        if not self.enabled:
            yield lambda spec, rec, reused: None
        elif self.tty:
            with _progress() as progress:
                self._progress = progress
                job = progress.add_task(name, total=total, length="")

                def tick(spec: dict, rec: dict, reused: bool) -> None:
                    progress.update(job, length=f"L={spec.get('length')}", advance=1)

                yield tick
        else:
            yield self._lines(name, total)

    def _lines(self, name: str, total: int):
        count, t0 = [0], time.perf_counter()

        def tick(spec: dict, rec: dict, reused: bool) -> None:
            count[0] += 1
            what = "reused" if reused else f"{rec['status']} score={rec['score']} in {rec['wall_s']:.1f} s"
            print(f"[{count[0]}/{total}] {name} {rec['sample_id']}: {what} ({time.perf_counter() - t0:.0f} s "
                  "elapsed)", file=sys.stderr, flush=True)

        return tick


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), TextColumn("{task.fields[length]}"), BarColumn(),
        MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
    )
