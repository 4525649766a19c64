"""The `infllm-eval` command line: run, ls, config, plan, report, check, merge, bench, score, data."""

from __future__ import annotations

import math
import sys
import time
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from infllm_eval.config import (GROUPS, check_runnable, choices, compose, expand_sweep, group_options, invocation,
                                resolved_yaml, searchpath_overrides, tool_defaults)
from infllm_eval.commands.data import data_app
from infllm_eval.errors import UserError, unknown_name

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Evaluate long-context methods (InfLLM, StreamingLLM, LM-Infinite, full attention) on "
                       "long-context tasks. Arguments are Hydra overrides: model=... method=... task=... key=value.")
app.add_typer(data_app, name="data")
out = Console()
err = Console(stderr=True)

OVERRIDES = typer.Argument(None, help="Hydra overrides, e.g. model=smollm2 method=full task.lengths=[4096]")
_failed_cells: list[str] = []


@app.command()
def run(
    overrides: Optional[list[str]] = OVERRIDES,
    multirun: bool = typer.Option(False, "-m", "--multirun", help="Sweep over comma lists (a,b) as Hydra multirun."),
) -> None:
    """Run one cell (or, with -m, every cell of a sweep); results go to output_dir/run_name.

    Exit codes: 0 done; 1 no sample finished (every one failed: error / oom / timeout / skipped), or with -m a
    cell that did not finish; 2 bad input (one sentence, nothing written); 130 interrupted (Ctrl-C or SIGTERM:
    finished samples are kept, the same command resumes)."""
    overrides = list(overrides or [])
    if not multirun:
        _refuse_sweep_settings(overrides)
    cells = expand_sweep(overrides) if multirun else [overrides]
    local = not multirun or choices(cells[0]).get("hydra/launcher") in LOCAL_LAUNCHERS
    cfgs = []
    for cell in cells:  # validate every cell before any model loads
        cfg = compose(cell)
        cfgs.append(cfg)
        from infllm_eval.methods import make_method

        make_method(cfg.method).check_chunk_size(int(cfg.chunk_size))
        if local:  # a cell that runs here needs its device here (a SLURM cell, on its node)
            check_runnable(cfg)
    if not multirun:
        if not _run_and_show(cfgs[0]):  # composed and validated above: one compose per run
            raise typer.Exit(1)
        return
    started = time.time()
    _run_hydra(overrides)
    # launchers may run cells in other processes (joblib) or on other machines (SLURM): a cell that finished
    # wrote its summary.csv during this sweep (atomically, at its end), whatever ran it
    from infllm_eval import cli as this  # noqa: PLW0406 - the importable module, also under `python -m`

    failed = sorted(set(this._failed_cells) | {_cell_name(c) for c in cfgs if not _finished_since(c, started)})
    if failed:
        err.print(f"[red]{len(failed)} of {len(cells)} cells failed:[/red] " + "; ".join(failed))
        raise typer.Exit(1)


#: launchers that run cells on this machine (the others submit them to other machines)
LOCAL_LAUNCHERS = ("basic", "joblib", "local_parallel", "submitit_local")


def _refuse_sweep_settings(overrides: list[str]) -> None:
    """hydra/launcher and hydra.launcher.* / hydra.sweeper.* choose how a sweep (-m) runs: without -m they would
    do nothing."""
    for o in overrides:
        key = o.lstrip("+~").partition("=")[0]
        if key.startswith(("hydra/launcher", "hydra/sweeper", "hydra.launcher", "hydra.sweeper")):
            raise UserError(f"'{o}' applies to sweeps only (run -m); a single run runs here, in this process.")


def _cell_name(cfg) -> str:
    return f"{cfg.model.name}/{cfg.method.name}/{cfg.task.name}"


def _finished_since(cfg, t0: float) -> bool:
    """The cell wrote its summary.csv since `t0` and at least one of its samples finished."""
    from infllm_eval.runner import run_dir_of
    from infllm_eval.store import SUMMARY_CSV

    summary = run_dir_of(cfg) / SUMMARY_CSV
    if not summary.exists() or summary.stat().st_mtime < t0 - 1:
        return False
    import pandas as pd

    try:
        return int(pd.read_csv(summary)["n_ok"].sum()) > 0
    except (ValueError, KeyError, OSError):
        return False


def _run_and_show(cfg) -> bool:
    """Runs one cell and shows its summary; False (and one line saying so) when no sample finished."""
    from infllm_eval.runner import run_cell, run_target

    target = run_target(cfg)  # the run directory and shard, once per run
    summary = run_cell(cfg, target)
    show_summary(summary, title=f"{cfg.model.name} · {cfg.method.name} · {cfg.task.name}")
    out.print(f"results: {target.dir}")
    if int(summary["n_ok"].sum()) > 0:
        return True
    failed = {k: int(summary[f"n_{k}"].sum()) for k in ("error", "oom", "timeout", "skipped")}
    print(f"no sample finished ({', '.join(f'{n} {k}' for k, n in failed.items() if n)}); each record's "
          f"'error' field in {target.dir}/samples.jsonl says why.", file=sys.stderr)
    return False


def _hydra_cell(cfg) -> None:
    """Body of one Hydra multirun job: a failing cell is reported and the sweep goes on."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    job = HydraConfig.get()
    with open_dict(cfg):  # what `compose` records, from the job's own choices and overrides
        cfg["invocation"] = invocation(dict(job.runtime.choices), list(job.overrides.task))
    name = _cell_name(cfg)
    try:
        if not _run_and_show(cfg):
            _failed_cells.append(name)
    except Exception as e:  # noqa: BLE001 - keep the sweep going; the error is reported at the end
        err.print(f"[red]cell {name} failed:[/red] {type(e).__name__}: {e}")
        _failed_cells.append(name)


def _run_hydra(overrides: list[str]) -> None:
    import hydra

    from infllm_eval import cli as this  # noqa: PLW0406 - see below
    from infllm_eval.paths import conf_dir
    from infllm_eval.tasks.hydra_group import register_task_group

    # the job function by its importable name: launchers that pickle it (joblib, submitit) then pickle a
    # reference, also when this file runs as __main__ (`python -m infllm_eval.cli`)
    main = hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    entry = main(this._hydra_cell)
    register_task_group()  # the `task` group (tasks/*.yaml), before Hydra composes the sweep's configs
    argv = sys.argv
    sys.argv = ["infllm-eval", "-m", *_force_keys_of_swept_groups(overrides), *searchpath_overrides()]
    try:
        entry()
    finally:
        sys.argv = argv


def _force_keys_of_swept_groups(overrides: list[str]) -> list[str]:
    """`method=a,b method.params.x=1`: Hydra first composes the sweep's base config with the group's *default*
    option, which may lack `x` ("not in struct"). Every cell was validated with the plain override already, so
    such keys are passed as `++key=value` (set or add): identical in each cell's own composition."""
    keys = [o.partition("=")[0] for o in overrides]
    swept = {k for k, o in zip(keys, overrides) if k in GROUPS and "," in o.partition("=")[2]}
    return [f"++{o}" if o[0] not in "+~" and "." in k and k.split(".")[0] in swept else o
            for k, o in zip(keys, overrides)]


#: the summary table's columns (summary.csv's names) and their short headers: whole at 80 columns
SUMMARY_HEADERS = {"length": "length", "depth": "depth", "n": "n", "n_ok": "ok", "score": "score",
                   "input_tokens": "tokens", "prefill_tok_s": "tok/s", "decode_s": "dec s", "peak_mem_mb": "MB"}


def show_summary(summary, title: str) -> None:
    table = Table(title=title, caption="tokens: input tokens · tok/s: prefill tokens/s · dec s: decode seconds · "
                                       "MB: peak memory", caption_justify="left")
    cols = list(SUMMARY_HEADERS)
    for c in cols:
        table.add_column(SUMMARY_HEADERS[c], justify="right", no_wrap=True)
    for row in summary.itertuples(index=False):
        vals = [getattr(row, c) for c in cols]
        table.add_row(*["" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in vals])
    bad = int(summary[["n_error", "n_oom", "n_timeout", "n_skipped"]].to_numpy().sum()) if len(summary) else 0
    ok = summary["n_ok"].sum() if len(summary) else 0
    mean = (summary["score"] * summary["n_ok"]).sum() / ok if ok else float("nan")
    out.print(table)
    out.print(f"score (mean over {ok} finished samples): {mean:.2f}" + (f"   [red]{bad} samples failed[/red]" if bad else ""))


@app.command("ls")
def ls(what: Optional[str] = typer.Argument(None, help="models | methods | tasks | presets (default: all)")) -> None:
    """List what can be chosen, with one-line descriptions."""
    plural = {"models": "model", "methods": "method", "tasks": "task", "presets": "preset"}
    if what is not None and what not in plural and what not in plural.values():
        raise unknown_name("listing", what, list(plural))
    groups = [plural.get(what, what)] if what else list(plural.values())
    for group in groups:
        table = Table(title=f"{group}s", show_header=True)
        table.add_column("name", style="bold")
        table.add_column("description")
        for name, desc in group_options(group).items():
            table.add_row(name, desc + (_layers_note(name) if group == "model" else ""))
        out.print(table)


def _layers_note(model: str) -> str:
    """For a model that mixes sliding-window and global layers: where a context method runs on it."""
    from infllm_eval.commands.plan import model_layer_types
    from infllm_eval.layout import GLOBAL

    window, types = model_layer_types(model)
    if window is None:
        return ""
    n_glob = types.count(GLOBAL)
    return (f" · methods run on its {n_glob} global layer{'s' * (n_glob > 1)}, its {len(types) - n_glob} local "
            f"ones keep their window of {window} (local_layers=method: every layer)")


@app.command("config")
def config(overrides: Optional[list[str]] = OVERRIDES) -> None:
    """Print the fully resolved config without running anything."""
    cfg = compose(list(overrides or []))
    from infllm_eval.methods import make_method

    make_method(cfg.method)
    sys.stdout.write(resolved_yaml(cfg))  # machine-readable: plain, never wrapped (`config ... > file.yaml`)
    from infllm_eval.commands.plan import model_shape
    from infllm_eval.layout import layer_plan

    try:
        shape = model_shape(cfg.model)
    except UserError:  # no shape (a plugin's model): nothing to say about its layers
        return
    if shape["sliding_window"]:  # a YAML comment: the output stays loadable
        sys.stdout.write(f"# layers: {layer_plan(shape['layer_types'], shape['sliding_window'], cfg.local_layers, cfg.method.name)}\n")


@app.command("report")
def report(
    root: str = typer.Argument(..., help="folder holding run directories (e.g. results/runs)"),
    out_dir: Optional[str] = typer.Option(None, "--out", help="report folder (default: ROOT/report)"),
    threshold: Optional[float] = typer.Option(None, help="effective-length threshold (conf/tools.yaml)"),
) -> None:
    """Tidy per-sample table (CSV + Parquet), pivots, effective length and plots of the runs under ROOT.
    Interrupted runs, unreadable lines or runs, duplicates and records outside a run's grid are listed (also on
    stderr); exit 2 only when no run under ROOT has a sample that counts."""
    from pathlib import Path

    from infllm_eval.commands.report import write_report

    d = tool_defaults("report")
    threshold = d["threshold"] if threshold is None else threshold
    warned: list[str] = []
    paths = write_report(root, out_dir or Path(root) / "report", threshold, d.get("paper_tables"), warned.append)
    print(paths["markdown"].read_text(encoding="utf-8"))
    for note in warned:
        print(f"warning: {note}", file=sys.stderr)  # plain print: never wrapped
    out.print(f"report: {paths['markdown'].parent} ({len(paths)} files)")


@app.command("check")
def check(
    results: str = typer.Argument(..., help="a run root or a tidy.csv / tidy.parquet written by `report`"),
    baseline: str = typer.Option(..., "--baseline", help="per-sample tidy CSV (or Parquet) to compare with"),
    tolerance: Optional[float] = typer.Option(None, help="score points a cell may drop (conf/tools.yaml)"),
    alpha: Optional[float] = typer.Option(None, help="one-sided significance level (conf/tools.yaml)"),
    bootstrap: Optional[int] = typer.Option(None, help="paired-bootstrap resamples (conf/tools.yaml)"),
    by_depth: bool = typer.Option(False, "--by-depth", help="compare each depth as its own cell"),
    allow_failures: Optional[bool] = typer.Option(None, "--allow-failures/--no-allow-failures",
                                                  help="newly failing samples do not fail the gate"),
) -> None:
    """Regression gate: exit 1 when a cell drops beyond the tolerance and significantly (paired test) or samples
    now fail; exit 2 when cells cannot be compared (nothing in common, another task fingerprint)."""
    from infllm_eval.commands.check import check as run_check

    d = tool_defaults("check")
    res = run_check(results, baseline, tolerance=d["tolerance"] if tolerance is None else tolerance,
                    alpha=d["alpha"] if alpha is None else alpha,
                    n_boot=d["bootstrap"] if bootstrap is None else bootstrap,
                    seed=int(d["seed"]), by_depth=by_depth,
                    allow_failures=d["allow_failures"] if allow_failures is None else allow_failures)
    print(res.markdown())
    if res.regressed:
        raise typer.Exit(1)
    if res.failed:
        raise UserError(res.problem())


@app.command("merge")
def merge(
    run_dir: str = typer.Argument(..., help="the unsharded run directory (no -shard suffix)"),
    remove_shards: bool = typer.Option(False, "--remove-shards", help="delete the shard directories after"),
) -> None:
    """Merge the shard directories of a run (shard=i/n) into one run directory; its summary is written when every
    shard is complete (else the warnings say what is missing and how to finish it)."""
    import pandas as pd

    from infllm_eval.commands.merge import merge_shards
    from infllm_eval.store import SUMMARY_CSV

    res = merge_shards(run_dir, remove_shards)
    if res.complete:
        show_summary(pd.read_csv(res.dir / SUMMARY_CSV), str(res.dir))
    for note in res.notes:
        print(f"warning: {note}", file=sys.stderr)  # plain print: never wrapped
    out.print(f"merged {res.added} new samples into {res.dir}" + ("" if res.complete else " (incomplete)"))


@app.command("plan")
def plan(
    overrides: Optional[list[str]] = OVERRIDES,
    multirun: bool = typer.Option(False, "-m", "--multirun", help="Plan every cell of a sweep."),
    budget_gb: Optional[float] = typer.Option(None, "--budget-gb", help="device memory per cell (conf/tools.yaml; "
                                              "null: this machine's GPU, its RAM for a CPU target)"),
    host_budget_gb: Optional[float] = typer.Option(None, "--host-budget-gb", help="host memory per cell for "
                                                   "offloaded KV (conf/tools.yaml; null: this machine's RAM)"),
) -> None:
    """Dry run: cells, samples, tokens and estimated peak memory per cell; no model weights load."""
    from infllm_eval.commands.plan import plan_cells, plan_markdown

    overrides = list(overrides or [])
    rows = plan_cells(expand_sweep(overrides) if multirun else [overrides], budget_gb, host_budget_gb)
    print(plan_markdown(rows))


@app.command("bench")
def bench(overrides: Optional[list[str]] = OVERRIDES) -> None:
    """Prefill throughput, decode latency, memory and FLOP/s of several methods side by side (bench.* keys)."""
    from infllm_eval.commands.bench import run_bench

    cols = ["method", "length", "status", "prefill_tok_s", "decode_ms_per_token", "peak_host_mb", "kv_device_mb",
            "kv_offloaded_mb", "workspace_mb", "useful_gflop_s", "mfu"]

    def show(row: dict) -> None:
        err.print(" ".join(f"{c}={row.get(c)}" for c in cols if row.get(c) is not None))

    df, folder = run_bench(list(overrides or []), on_row=show)
    table = Table(title=f"bench · {df['model'].iloc[0]} · {df['device'].iloc[0]} · "
                        f"matmul peak {df['peak_matmul_gflop_s'].iloc[0]} GFLOP/s")
    for c in cols:
        table.add_column(c, justify="right")
    for row in df.reindex(columns=cols).itertuples(index=False):
        table.add_row(*["" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in row])
    out.print(table)
    out.print(f"results: {folder}/bench.csv (+ bench.md, bench_throughput.png, bench_memory.png)")


@app.command("score")
def score(
    path: str = typer.Argument(..., help="a predictions .jsonl (LongBench / InfLLM format) or a run directory"),
    task: Optional[str] = typer.Option(None, "--task", help="LongBench dataset or ∞-Bench task, e.g. trec, "
                                       "longbench_trec, passkey (default: the file name before its first '.'; "
                                       "a run directory: its config's metric)"),
    per_sample: Optional[str] = typer.Option(None, "--per-sample", help="write each line's score (0-1) here"),
    e: bool = typer.Option(False, "--e", help="LongBench-E split by length (implied by a task ending in _e)"),
    out_dir: Optional[str] = typer.Option(None, "--out", help="a run directory's rescored records and summary "
                                          "go here (default: RUN_DIR/rescored-<metric>); the run is not changed"),
) -> None:
    """Score saved predictions with the official scorers, without a model: prints round(100 * mean, 2)."""
    from pathlib import Path

    from infllm_eval.commands.score import RESCORED_FILE, rescore_run, score_file, write_per_sample

    if Path(path).is_dir():
        if per_sample or e:
            raise UserError(f"--{'per-sample' if per_sample else 'e'} applies to a predictions file; a run "
                            f"directory's per-sample scores go to {RESCORED_FILE} (--out).")
        metric, n, summary, target = rescore_run(path, task, out_dir)
        show_summary(summary, title=f"rescored with {metric}")
        print(f"rescored {n} samples with {metric} -> {target}/{RESCORED_FILE} (+ summary.csv/.md); "
              f"the run's own files are unchanged")
        return
    if out_dir:
        raise UserError("--out applies to a run directory; for a predictions file use --per-sample FILE.")
    res = score_file(path, task, buckets=e)
    print(f"{res.task} ({res.metric}, {len(res.scores)} samples): {res.aggregate}")
    if res.buckets:
        print("  ".join(f"{k}: {v}" for k, v in res.buckets.items()))
    if per_sample:
        out.print(f"per-sample scores: {write_per_sample(res, per_sample)}")


#: click's UsageError as typer uses it (typer >= 0.25 vendors click): the base class of typer.BadParameter
_USAGE_ERROR = typer.BadParameter.__mro__[1]


def main() -> None:
    try:
        code = app(standalone_mode=False)  # click's usage errors come here too, to be said in one line
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)  # plain print: one line, never wrapped
        sys.exit(2)
    except _USAGE_ERROR as e:  # unknown command or option, missing argument, a value of the wrong type
        sub = e.ctx.command_path.partition(" ")[2] if e.ctx else ""
        where = f" (see 'infllm-eval {sub + ' ' if sub else ''}--help')"
        print(f"error: {e.format_message()}{where}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:  # Ctrl-C outside a run (a run says what it kept itself)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
