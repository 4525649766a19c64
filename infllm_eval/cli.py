"""The `infllm-eval` command line: run, ls, config."""

from __future__ import annotations

import math
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from infllm_eval.config import GROUPS, compose, expand_sweep, group_options, resolved_yaml
from infllm_eval.errors import UserError, unknown_name

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Evaluate long-context methods (InfLLM, StreamingLLM, LM-Infinite, full attention) on "
                       "long-context tasks. Arguments are Hydra overrides: model=... method=... task=... key=value.")
out = Console()
err = Console(stderr=True)

OVERRIDES = typer.Argument(None, help="Hydra overrides, e.g. model=smollm2 method=full task.lengths=[4096]")
_failed_cells: list[str] = []


@app.command()
def run(
    overrides: Optional[list[str]] = OVERRIDES,
    multirun: bool = typer.Option(False, "-m", "--multirun", help="Sweep over comma lists (a,b) as Hydra multirun."),
) -> None:
    """Run one cell (or, with -m, every cell of a sweep); results go to output_dir/run_name."""
    overrides = list(overrides or [])
    cells = expand_sweep(overrides) if multirun else [overrides]
    for cell in cells:  # validate every cell before any model loads
        try:
            cfg = compose(cell)
        except UserError as e:
            if not multirun and any("," in o.partition("=")[2] and "[" not in o for o in cell):
                raise UserError(f"{e} (comma lists are sweeps: add -m to run every combination)") from e
            raise
        from infllm_eval.methods import make_method

        make_method(cfg.method)
    if not multirun:
        _run_and_show(compose(overrides))
        return
    _run_hydra(overrides)
    if _failed_cells:
        err.print(f"[red]{len(_failed_cells)} of {len(cells)} cells failed:[/red] " + "; ".join(_failed_cells))
        raise typer.Exit(1)


def _run_and_show(cfg) -> None:
    from infllm_eval.runner import run_cell, run_dir_of

    summary = run_cell(cfg)
    show_summary(summary, title=f"{cfg.model.name} · {cfg.method.name} · {cfg.task.name}")
    out.print(f"results: {run_dir_of(cfg)}")


def _hydra_cell(cfg) -> None:
    """Body of one Hydra multirun job: a failing cell is reported and the sweep goes on."""
    try:
        _run_and_show(cfg)
    except Exception as e:  # noqa: BLE001 - keep the sweep going; the error is reported at the end
        name = f"{cfg.model.name}/{cfg.method.name}/{cfg.task.name}"
        err.print(f"[red]cell {name} failed:[/red] {type(e).__name__}: {e}")
        _failed_cells.append(name)


def _run_hydra(overrides: list[str]) -> None:
    import hydra

    from infllm_eval.paths import conf_dir

    entry = hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(_hydra_cell)
    argv = sys.argv
    sys.argv = ["infllm-eval", "-m", *overrides]
    try:
        entry()
    finally:
        sys.argv = argv


def show_summary(summary, title: str) -> None:
    table = Table(title=title)
    cols = ["length", "depth", "n", "n_ok", "score", "input_tokens", "prefill_tok_s", "decode_s", "peak_mem_mb"]
    for c in cols:
        table.add_column(c, justify="right")
    for row in summary.itertuples(index=False):
        vals = [getattr(row, c) for c in cols]
        table.add_row(*["" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in vals])
    bad = int(summary[["n_error", "n_oom", "n_timeout"]].to_numpy().sum()) if len(summary) else 0
    ok = summary["n_ok"].sum() if len(summary) else 0
    mean = (summary["score"] * summary["n_ok"]).sum() / ok if ok else float("nan")
    out.print(table)
    out.print(f"score (mean over {ok} finished samples): {mean:.2f}" + (f"   [red]{bad} samples failed[/red]" if bad else ""))


@app.command("ls")
def ls(what: Optional[str] = typer.Argument(None, help="models | methods | tasks (default: all three)")) -> None:
    """List what can be chosen, with one-line descriptions."""
    plural = {"models": "model", "methods": "method", "tasks": "task"}
    if what is not None and what not in plural and what not in GROUPS:
        raise unknown_name("listing", what, list(plural))
    groups = [plural.get(what, what)] if what else list(GROUPS)
    for group in groups:
        table = Table(title=f"{group}s", show_header=True)
        table.add_column("name", style="bold")
        table.add_column("description")
        for name, desc in group_options(group).items():
            table.add_row(name, desc)
        out.print(table)


@app.command("config")
def config(overrides: Optional[list[str]] = OVERRIDES) -> None:
    """Print the fully resolved config without running anything."""
    cfg = compose(list(overrides or []))
    from infllm_eval.methods import make_method

    make_method(cfg.method)
    out.print(resolved_yaml(cfg), markup=False, highlight=False)


def main() -> None:
    try:
        app()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)  # plain print: one line, never wrapped
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted; finished samples are saved and the run resumes when re-run.")
        sys.exit(130)


if __name__ == "__main__":
    main()
