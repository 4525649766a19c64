"""Reports: every run directory under a root -> one tidy per-sample table + markdown pivots + plots.

The tidy table is `store.load_runs(root)`: one row per sample (content key), the records that count by
`store.current_records` (each run's current config and grid, as its summary.csv), read-only. Nothing is left
out silently: report.md lists, and tidy.csv marks, interrupted runs (`run_status`), unreadable lines
(`run_corrupt_lines`), records outside a run's current grid (kept on disk, not counted), the same sample found
in several run directories (one row, the record a resume would keep) and run directories whose config.yaml or
provenance.json cannot be read (listed with the reason; the others are reported; `report` exits 0 when at
least one run has a sample that counts, else 2).

Derived views (`write_report`): tidy.csv / tidy.parquet, cells.csv (one row per model x method x task x length
x depth), report.md (the paper's ∞-Bench / LongBench table layouts with their averages, task x method per model,
length x method per model and task with effective length, failures, incomparable cells) and PNG plots. Cells
that share model/method/task/length but differ in task fingerprint, prompt profile or method/model fingerprint
are *incomparable*: flagged and left out of pivots, never averaged. Failed samples (error / oom / timeout) are
counted in their own columns and never scored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pandas as pd

from infllm_eval.errors import UserError
from infllm_eval.store import (AXES, CELL, FAILED, INTERRUPTED, LOCK_FILE, SAMPLES_FILE, TIDY_CSV, TIDY_PARQUET,
                               RunsScan, load_runs, scan_runs, to_markdown)

#: provenance columns that must agree for two runs' samples of one cell to be averaged
SIGNATURE = ["task_fingerprint", "prompt_profile", "method_fingerprint", "model_fingerprint"]


# -- derived views -------------------------------------------------------------------------------------------
def incomparable(df: pd.DataFrame) -> pd.DataFrame:
    """Cells (model, method, task, length) whose samples come from runs that differ in a SIGNATURE column."""
    sig = [c for c in SIGNATURE if c in df.columns]
    rows = []
    for keys, g in df.groupby(CELL, dropna=False):
        differing = [c for c in sig if g[c].nunique(dropna=False) > 1]
        if differing:
            rows.append(
                {
                    **dict(zip(CELL, keys)),
                    "differs_in": ", ".join(differing),
                    "runs": ", ".join(sorted(g["run_dir"].astype(str).unique())),
                }
            )
    return pd.DataFrame(rows, columns=CELL + ["differs_in", "runs"])


def _aggregate(g: pd.DataFrame) -> dict:
    ok = g[g["status"] == "ok"]
    return {
        "n": len(g),
        "n_ok": len(ok),
        **{f"n_{s}": int((g["status"] == s).sum()) for s in FAILED},
        "score": round(100 * ok["score"].mean(), 2) if len(ok) else float("nan"),
        "prefill_s": round(ok["prefill_s"].mean(), 3) if len(ok) else float("nan"),
        "decode_s": round(ok["decode_s"].mean(), 3) if len(ok) else float("nan"),
        "total_s": round(ok["total_s"].mean(), 3) if len(ok) else float("nan"),
        "peak_mem_mb": round(g["peak_mem_mb"].max(), 1) if g["peak_mem_mb"].notna().any() else float("nan"),
    }


def cells(df: pd.DataFrame, by: list[str] = AXES) -> pd.DataFrame:
    """One row per `by` group: n, failures by kind (never scored), score 0-100 over finished samples, timings,
    peak memory. Where the samples come from incomparable runs, `comparable` is False and the group gets one
    row per run (`run_dir`) instead of an average."""
    bad = incomparable(df)
    bad_keys = {tuple(r) for r in bad[CELL].itertuples(index=False)}
    d = df.assign(depth=df["depth"].fillna(-1.0)) if "depth" in by else df
    rows = []
    for keys, g in d.groupby(by, dropna=False, sort=True):
        keys = keys if isinstance(keys, tuple) else (keys,)
        comparable = not any(tuple(k) in bad_keys for k in g[CELL].drop_duplicates().itertuples(index=False))
        parts = (
            [("", g)] if comparable else list(g.groupby("run_dir", sort=True))
        )  # one row per run, unaveraged
        for run_dir, part in parts:
            rows.append(
                {**dict(zip(by, keys)), **_aggregate(part), "comparable": comparable, "run_dir": run_dir}
            )
    out = pd.DataFrame(rows)
    if "depth" in by and len(out):
        out["depth"] = out["depth"].where(out["depth"] >= 0, None)
    return out


def effective_length(length_cells: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Per model x method x task: the longest length up to which every length scores >= threshold (RULER's
    effective length); 0 when the shortest length already falls below; NaN when a length is incomparable or
    has no finished sample (the answer would be a guess)."""
    rows = []
    for keys, g in length_cells.groupby(["model", "method", "task"], sort=True):
        g = g.sort_values("length")
        eff: float = 0
        for r in g.itertuples(index=False):
            if not r.comparable or pd.isna(r.score):
                eff = float("nan")
                break
            if r.score < threshold:
                break
            eff = r.length
        rows.append(
            {
                **dict(zip(["model", "method", "task"], keys)),
                "effective_length": eff,
                "threshold": threshold,
                "lengths": ",".join(str(x) for x in g["length"]),
            }
        )
    return pd.DataFrame(rows)


def _sized(c: pd.DataFrame) -> pd.DataFrame:
    """Cells with a target length (synthetic tasks); benchmark rows have none (length 0)."""
    return c[c["length"].notna() & (c["length"] > 0)]


def _md_table(df: pd.DataFrame) -> str:
    return "_(none)_\n" if df.empty else to_markdown(df, _fmt)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v)) if abs(v) >= 1000 else f"{v:.1f}"
    return str(v)


def _pivot(c: pd.DataFrame, index: str, columns: str = "method") -> pd.DataFrame:
    """score pivot; incomparable cells show 'incomparable', cells without a finished sample 'failed'."""
    c = c.copy()
    c["value"] = [
        ("incomparable" if not r.comparable else "failed" if pd.isna(r.score) else f"{r.score:.1f}")
        for r in c.itertuples(index=False)
    ]
    c = c.drop_duplicates(subset=[index, columns])  # incomparable cells have one row per run
    p = c.pivot(index=index, columns=columns, values="value").reset_index()
    p.columns.name = None
    return p.fillna("")


def paper_table(task_cells: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """One model's task cells in a paper table's layout: a row per method, a column per label (its task's score),
    and `Avg.` = mean of the column scores, only when every column has a comparable finished score (the paper
    averages complete rows); otherwise `Avg.` says how many columns are missing. Empty if no column's task ran."""
    tasks = set(task_cells["task"])
    if not tasks & set(columns.values()):
        return pd.DataFrame()
    rows = []
    for method, g in task_cells.groupby("method", sort=True):
        by_task = {r.task: r for r in g.drop_duplicates(subset=["task"]).itertuples(index=False)}
        row, vals = {"method": method}, []
        for label, task in columns.items():
            r = by_task.get(task)
            if r is None:
                row[label] = ""
            elif not r.comparable:
                row[label] = "incomparable"
            elif pd.isna(r.score):
                row[label] = "failed"
            else:
                row[label] = f"{r.score:.2f}"
                vals.append(r.score)
        missing = len(columns) - len(vals)
        row["Avg."] = f"{sum(vals) / len(vals):.2f}" if not missing else f"n/a ({missing} missing)"
        rows.append(row)
    return pd.DataFrame(rows)


def _dirs(names) -> str:
    names = sorted(str(n) for n in names)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def notes(scan: RunsScan) -> list[str]:
    """One line per kind of thing the tidy table does not count as a plain sample (empty when there is none)."""
    r, out = scan.runs, []
    unreadable = r[r["unreadable"] != ""]
    for row in unreadable.itertuples(index=False):
        out.append(f"unreadable run {row.run_dir}: {row.unreadable} (left out of every table)")
    readable = r[r["unreadable"] == ""]
    interrupted = readable[readable["run_status"] == INTERRUPTED]
    if len(interrupted):
        out.append(f"{len(interrupted)} interrupted runs (no summary.csv, or samples.jsonl newer than it: killed, "
                   f"still running, or stopped before their first sample): {_dirs(interrupted['run_dir'])}")
    for row in readable[readable["corrupt_lines"] > 0].itertuples(index=False):
        torn = " (the last one torn: its writer was killed mid-line)" if row.torn_last_line else ""
        out.append(f"{row.corrupt_lines} unreadable lines of {row.run_dir}/{SAMPLES_FILE} skipped{torn}")
    outside = readable[readable["outside_grid"] > 0]
    if len(outside):
        out.append(f"{int(outside['outside_grid'].sum())} records outside the current grid of their run's "
                   f"config.yaml (kept on disk, not counted, as in summary.csv): {_dirs(outside['run_dir'])}")
    for row in scan.duplicates.itertuples(index=False):
        out.append(f"{row.n} duplicate samples folded: the same content key in {row.kept_run_dir} (kept) and "
                   f"{row.dropped_run_dir} (not counted again)")
    return out


def _runs_section(scan: RunsScan) -> str:
    lines = notes(scan)
    flagged = "".join(f"- {n}\n" for n in lines) if lines else "Every run complete and fully read.\n"
    return "\n## Runs\n\n" + flagged + "\n" + to_markdown(scan.runs, _fmt)


def markdown(df: pd.DataFrame, threshold: float, paper_tables: dict | None = None,
             scan: RunsScan | None = None) -> str:
    """report.md of the tidy table `df`; with `scan` (what `scan_runs` read) also the runs and what was not
    counted."""
    length_cells = cells(df, CELL)
    task_cells = cells(df, ["model", "method", "task"])
    bad = incomparable(df)
    n_failed = int(df["status"].isin(FAILED).sum())
    flagged = f" **{len(notes(scan))} warnings: see Runs.**" if scan is not None and notes(scan) else ""
    parts = [
        (
            f"# infllm-eval report\n\n{df['run_dir'].nunique()} runs, {len(df)} samples, {n_failed} failed "
            f"(error / oom / timeout; counted, never scored). Scores are 0-100 over finished samples.{flagged}\n"
        )
    ]
    if scan is not None:
        parts.append(_runs_section(scan))
    if len(bad):
        parts.append("\n## Incomparable cells (left out of the pivots)\n\n" + _md_table(bad))
    for model, g in task_cells.groupby("model"):
        for spec in (paper_tables or {}).values():
            t = paper_table(g, dict(spec["columns"]))
            if len(t):
                parts.append(f"\n## {model}: {spec['title']}\n\n" + _md_table(t))
        parts.append(
            f"\n## {model}: task x method (every length and depth run)\n\n" + _md_table(_pivot(g, "task"))
        )
    eff = effective_length(length_cells, threshold)
    for (model, task), g in _sized(length_cells).groupby(["model", "task"]):
        p = _pivot(g, "length").astype(object)
        e = eff[(eff["model"] == model) & (eff["task"] == task)].set_index("method")["effective_length"]
        p.loc[len(p)] = [f"effective (>= {threshold:g})"] + [_fmt(e.get(m)) for m in p.columns[1:]]
        parts.append(f"\n## {model} / {task}: length x method\n\n" + _md_table(p))
    fails = length_cells[length_cells[[f"n_{s}" for s in FAILED]].sum(axis=1) > 0]
    parts.append("\n## Failed samples\n\n" + _md_table(fails[CELL + ["n"] + [f"n_{s}" for s in FAILED]]))
    parts.append("\n## Cells\n\n" + _md_table(length_cells))
    return "".join(parts)


# -- plots ---------------------------------------------------------------------------------------------------
def plots(df: pd.DataFrame, out: Path) -> list[Path]:
    """PNGs: depth x length heatmap per model/method/task (tasks with depths), score vs length, score vs
    memory / time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    depth_cells = cells(df, AXES)
    for (model, method, task), g in depth_cells[depth_cells["depth"].notna()].groupby(
        ["model", "method", "task"]
    ):
        grid = g[g["comparable"]].pivot_table(index="depth", columns="length", values="score", aggfunc="mean")
        if grid.empty:
            continue
        fig, ax = plt.subplots(figsize=(max(6.0, 2.0 + 0.9 * grid.shape[1]), max(4.0, 1.5 + 0.45 * grid.shape[0])))
        im = ax.imshow(grid.to_numpy(), vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(grid.shape[1]), [str(x) for x in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [f"{y:.2f}" for y in grid.index])
        for (i, j), v in pd.DataFrame(grid.to_numpy()).stack().items():
            if not pd.isna(v):  # cells never run stay blank
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xlabel("length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{model} · {method} · {task}", fontsize=9)
        fig.colorbar(im, ax=ax, label="score")
        written.append(_save(fig, out / f"heatmap_{model}_{method}_{task}.png"))
    length_cells = cells(df, CELL)
    ok_cells = length_cells[length_cells["comparable"] & length_cells["score"].notna()]
    for (model, task), g in ok_cells.groupby(["model", "task"]):
        sized = _sized(g)
        if len(sized):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for method, m in sized.groupby("method"):
                ax.plot(m["length"], m["score"], marker="o", label=method)
            ax.set_xscale("log", base=2)
            ticks = sorted(sized["length"].unique())
            ax.set_xticks(ticks, [_length_label(t) for t in ticks])
            ax.minorticks_off()
            ax.set_xlabel("length (tokens)")
            _score_axis(ax)
            ax.set_title(f"{model} · {task}", fontsize=9)
            ax.legend(fontsize=7)
            written.append(_save(fig, out / f"score_vs_length_{model}_{task}.png"))
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
        for method, m in g.groupby("method"):
            axes[0].scatter(m["peak_mem_mb"], m["score"], label=method)
            axes[1].scatter(m["total_s"], m["score"], label=method)
        axes[0].set_xlabel("peak memory (MB)")
        axes[1].set_xlabel("time per sample (s, prefill + decode)")
        _score_axis(axes[0])
        axes[1].legend(fontsize=8, title="method (labels: length)", title_fontsize=8)
        fig.suptitle(f"{model} · {task}", fontsize=10)
        fig.tight_layout()
        for ax, x in zip(axes, ("peak_mem_mb", "total_s")):
            _label_points(ax, [(getattr(r, x), r.score, _length_label(r.length)) for r in g.itertuples(index=False)])
        written.append(_save(fig, out / f"score_vs_cost_{model}_{task}.png", layout=False))
    return written


def _score_axis(ax) -> None:
    """Scores always on the same 0-100 axis (a little margin so points at 0 and 100 show whole)."""
    ax.set_ylim(-3, 103)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("score")


def _length_label(length: Any) -> str:
    return f"{int(length) // 1024}K" if length and int(length) % 1024 == 0 else str(length)


def _label_points(ax, points: list[tuple[float, float, str]], fontsize: int = 7) -> None:
    """Labels next to their points, each moved (down in the upper half, up in the lower half) until it overlaps
    no label placed before."""
    renderer = ax.figure.canvas.get_renderer()
    placed = []
    for x, y, text in sorted(points, key=lambda p: (p[1], p[0])):
        if pd.isna(x) or pd.isna(y):
            continue
        step = -(fontsize + 2) if y > 50 else fontsize + 2
        label = ax.annotate(text, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=fontsize)
        box = label.get_window_extent(renderer)
        while any(box.overlaps(b) for b in placed):
            label.xyann = (label.xyann[0], label.xyann[1] + step)
            box = label.get_window_extent(renderer)
        placed.append(box)


def _save(fig, path: Path, layout: bool = True) -> Path:
    import matplotlib.pyplot as plt

    if layout:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- entry ---------------------------------------------------------------------------------------------------
def write_report(root: str | Path, out: str | Path, threshold: float, paper_tables: dict | None = None,
                 warn: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Reads every run under `root` (`scan_runs`); writes tidy.csv, tidy.parquet, cells.csv, effective_length.csv,
    report.md (with the paper-style tables of `paper_tables`, conf/tools.yaml `report.paper_tables`, and the runs
    with everything not counted) and PNG plots into `out`; `warn` gets each such note. Returns the written paths
    by name. A UserError (nothing written) when no run has a sample that counts."""
    if not 0 <= threshold <= 100:
        raise UserError(f"--threshold is a score (0-100); got {threshold:g}.")
    out = Path(out)
    if (out / SAMPLES_FILE).exists() or (out / LOCK_FILE).exists():
        raise UserError(f"'{out}' is a run directory; pass --out a folder of its own (default: ROOT/report).")
    scan = scan_runs(root)
    df = load_runs(root, scan)
    for note in notes(scan) if warn else []:
        warn(note)
    try:
        return _write(df, scan, out, threshold, paper_tables)
    except OSError as e:
        raise UserError(f"Cannot write the report into '{out}' ({e.strerror}); pass --out DIR.") from e


def _write(df: pd.DataFrame, scan: RunsScan, out: Path, threshold: float, paper_tables: dict | None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "tidy_csv": out / TIDY_CSV,
        "tidy_parquet": out / TIDY_PARQUET,
        "cells": out / "cells.csv",
        "effective_length": out / "effective_length.csv",
        "markdown": out / "report.md",
    }
    df.to_csv(paths["tidy_csv"], index=False)
    df.to_parquet(paths["tidy_parquet"], index=False)
    cells(df).to_csv(paths["cells"], index=False)
    effective_length(cells(df, CELL), threshold).to_csv(paths["effective_length"], index=False)
    paths["markdown"].write_text(markdown(df, threshold, paper_tables, scan), encoding="utf-8")
    for p in plots(df, out):
        paths[p.stem] = p
    return paths
