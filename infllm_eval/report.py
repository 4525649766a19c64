"""Reports: every run directory under a root -> one tidy per-sample table + markdown pivots + plots.

`load_runs(root)` reads each run directory (config.yaml, provenance.json, samples.jsonl) **read-only** (a torn
last line of a run still being written is skipped, never truncated) and returns one row per sample: the axes
(model, method, task, length, depth, sample_id), the result (score, status, timings, peak memory, input
tokens, truncation) and the provenance (git commit, versions, device, dtype, model / task / method
fingerprints, prompt profile).

Which records count: a run directory accumulates records of every config it was run with; only the records
whose content key belongs to the directory's current config are kept (the `cell_key` the runner writes, or for
older runs the same key recomputed from provenance), one per sample (the latest `ok` one, else the latest
failure).

Derived views (`write_report`): tidy.csv / tidy.parquet, cells.csv (one row per model x method x task x length
x depth), report.md (the paper's ∞-Bench / LongBench table layouts with their averages, task x method per model,
length x method per model and task with effective length, failures, incomparable cells) and PNG plots. Cells
that share model/method/task/length but differ in task fingerprint, prompt profile or method/model fingerprint
are *incomparable*: flagged and left out of pivots, never averaged. Failed samples (error / oom / timeout) are
counted in their own columns and never scored.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from infllm_eval.errors import UserError
from infllm_eval.store import content_key

AXES = ["model", "method", "task", "length", "depth"]
CELL = ["model", "method", "task", "length"]
FAILED = ("error", "oom", "timeout", "skipped")  # counted separately, never scored
#: provenance columns that must agree for two runs' samples of one cell to be averaged
SIGNATURE = ["task_fingerprint", "prompt_profile", "method_fingerprint", "model_fingerprint"]
RESULT_COLS = [
    "sample_id",
    "key",
    "score",
    "status",
    "error",
    "n_input_tokens",
    "truncated",
    "n_dropped",
    "prefill_s",
    "decode_s",
    "new_tokens",
    "stopped_by",
    "peak_mem_bytes",
    "prediction",
    "answers",
    "finished_at",
]


# -- reading -------------------------------------------------------------------------------------------------
def read_records(samples_path: Path) -> list[dict]:
    """Complete JSON lines of a samples.jsonl, without modifying the file (a torn last line is skipped)."""
    out = []
    for line in samples_path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a writer killed (or still writing) mid-line
    return out


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _current_records(records: list[dict], prov: dict, cfg: dict) -> list[dict]:
    """The records that belong to the run directory's current config, one per sample."""
    cell_key = prov.get("cell_key")
    if cell_key is not None:
        mine = [r for r in records if r.get("cell_key") == cell_key]
    else:  # runs written before cell_key existed: recompute the runner's keys from provenance
        mine = []
        base = {
            "harness": (prov.get("versions") or {}).get("infllm-eval"),
            "model": prov.get("model_fingerprint"),
            "method": prov.get("method"),
            "task": prov.get("task_fingerprint"),
            "generation": prov.get("generation"),
            "device": str(prov.get("device", "")).split(":")[0],
        }
        for dtype in _dtype_candidates(cfg, base["device"]):
            expected = {
                sid: content_key({**base, "dtype": dtype}, sid)
                for sid in {r.get("sample_id") for r in records}
            }
            hits = [r for r in records if r.get("key") == expected[r.get("sample_id")]]
            if len(hits) > len(mine):
                mine = hits
        if not mine:  # keys cannot be re-derived (e.g. written by another harness version): latest per sample
            by_id = {r.get("sample_id"): r for r in records}
            mine = [
                {**r, "key": r.get("key") or r.get("sample_id"), "_unverified": True} for r in by_id.values()
            ]
    latest: dict[str, dict] = {}
    for r in mine:  # later lines win, but a finished sample is never replaced by a failure
        prev = latest.get(r["key"])
        if prev is None or r.get("status") == "ok" or prev.get("status") != "ok":
            latest[r["key"]] = r
    return list(latest.values())


def _dtype_candidates(cfg: dict, device_type: str) -> list[str]:
    names = {
        "float32": "torch.float32",
        "fp32": "torch.float32",
        "bfloat16": "torch.bfloat16",
        "bf16": "torch.bfloat16",
        "float16": "torch.float16",
        "fp16": "torch.float16",
    }
    if cfg.get("dtype") in names:
        return [names[cfg["dtype"]]]
    return (
        ["torch.bfloat16", "torch.float32"] if device_type == "cuda" else ["torch.float32", "torch.bfloat16"]
    )


def _run_columns(root: Path, run_dir: Path, cfg: dict, prov: dict) -> dict:
    git = prov.get("git") or {}
    versions = prov.get("versions") or {}
    method = dict(prov.get("method") or {})
    task = cfg.get("task") or {}
    return {
        "run_dir": str(run_dir.relative_to(root)) if run_dir != root else ".",
        "git_commit": git.get("commit"),
        "git_dirty": git.get("dirty"),
        "harness_version": versions.get("infllm-eval"),
        "torch_version": versions.get("torch"),
        "transformers_version": versions.get("transformers"),
        "device": prov.get("device"),
        "device_name": prov.get("device_name"),
        "dtype": str(prov.get("dtype") or cfg.get("dtype")).removeprefix("torch."),
        "seed": prov.get("seed", cfg.get("seed")),
        "chunk_size": cfg.get("chunk_size"),
        "max_new_tokens": (prov.get("generation") or {}).get("max_new_tokens"),
        "model_fingerprint": prov.get("model_fingerprint"),
        "task_fingerprint": prov.get("task_fingerprint"),
        "prompt_profile": task.get("profile"),
        "method_fingerprint": _short_hash(method),
        "method_params": json.dumps(
            {k: v for k, v in method.items() if k not in ("name", "position_scheme")}, sort_keys=True
        ),
        "shard": cfg.get("shard"),
    }


def find_runs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("samples.jsonl") if (p.parent / "config.yaml").is_file())


def load_runs(root: str | Path) -> pd.DataFrame:
    """One row per sample over every run directory under `root` (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(
            f"Results root '{root}' is not a directory; pass a folder that holds run directories."
        )
    rows = []
    for run_dir in find_runs(root):
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        prov_path = run_dir / "provenance.json"
        prov = json.loads(prov_path.read_text()) if prov_path.is_file() else {}
        run_cols = _run_columns(root, run_dir, cfg, prov)
        for r in _current_records(read_records(run_dir / "samples.jsonl"), prov, cfg):
            row = {k: r.get(k) for k in ("model", "method", "task", "length", "depth")}
            row.update({k: r.get(k) for k in RESULT_COLS})
            row["answers"] = (
                json.dumps(r.get("answers"), ensure_ascii=False) if r.get("answers") is not None else None
            )
            row["config_verified"] = not r.get(
                "_unverified", False
            )  # record provably of the run's current config
            row.update(run_cols)
            rows.append(row)
    if not rows:
        raise UserError(
            f"No run directories with samples under '{root}' (each needs config.yaml and samples.jsonl)."
        )
    df = pd.DataFrame(rows)
    df["peak_mem_mb"] = (df["peak_mem_bytes"] / 2**20).round(1)
    df["total_s"] = df["prefill_s"] + df["decode_s"]
    return df.sort_values(
        AXES[:4] + ["depth", "sample_id", "run_dir"], na_position="first", kind="stable", ignore_index=True
    )


def read_table(path: str | Path) -> pd.DataFrame:
    """A tidy table written by `write_report` (CSV or Parquet), or built from a run root."""
    path = Path(path)
    if path.is_dir():
        return load_runs(path)
    if not path.is_file():
        raise UserError(
            f"'{path}' does not exist; pass a run root or a tidy.csv / tidy.parquet from `report`."
        )
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    missing = [c for c in AXES + ["sample_id", "score", "status"] if c not in df.columns]
    if missing:
        raise UserError(f"'{path}' is not a tidy table from `infllm-eval report` (no column {missing[0]}).")
    return df


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
    if df.empty:
        return "_(none)_\n"
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


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


def markdown(df: pd.DataFrame, threshold: float, paper_tables: dict | None = None) -> str:
    length_cells = cells(df, CELL)
    task_cells = cells(df, ["model", "method", "task"])
    bad = incomparable(df)
    n_failed = int(df["status"].isin(FAILED).sum())
    parts = [
        (
            f"# infllm-eval report\n\n{df['run_dir'].nunique()} runs, {len(df)} samples, {n_failed} failed "
            f"(error / oom / timeout; counted, never scored). Scores are 0-100 over finished samples.\n"
        )
    ]
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
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * grid.shape[1], 1.0 + 0.45 * grid.shape[0]))
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
            fig, ax = plt.subplots(figsize=(5, 3.2))
            for method, m in sized.groupby("method"):
                ax.plot(m["length"], m["score"], marker="o", label=method)
            ax.set_xscale("log", base=2)
            ticks = sorted(sized["length"].unique())
            ax.set_xticks(ticks, [f"{t // 1024}K" if t % 1024 == 0 else str(t) for t in ticks])
            ax.minorticks_off()
            ax.set_xlabel("length (tokens)")
            ax.set_ylabel("score")
            ax.set_ylim(-5, 105)
            ax.set_title(f"{model} · {task}", fontsize=9)
            ax.legend(fontsize=7)
            written.append(_save(fig, out / f"score_vs_length_{model}_{task}.png"))
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
        for method, m in g.groupby("method"):
            axes[0].scatter(m["peak_mem_mb"], m["score"], label=method)
            axes[1].scatter(m["total_s"], m["score"], label=method)
            for r in m.itertuples(index=False):
                axes[0].annotate(str(r.length), (r.peak_mem_mb, r.score), fontsize=6, alpha=0.7)
                axes[1].annotate(str(r.length), (r.total_s, r.score), fontsize=6, alpha=0.7)
        axes[0].set_xlabel("peak memory (MB)")
        axes[1].set_xlabel("time per sample (s, prefill + decode)")
        axes[0].set_ylabel("score")
        axes[1].legend(fontsize=7)
        fig.suptitle(f"{model} · {task}", fontsize=9)
        written.append(_save(fig, out / f"score_vs_cost_{model}_{task}.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- entry ---------------------------------------------------------------------------------------------------
def write_report(root: str | Path, out: str | Path, threshold: float,
                 paper_tables: dict | None = None) -> dict[str, Path]:
    """Reads every run under `root`; writes tidy.csv, tidy.parquet, cells.csv, effective_length.csv, report.md
    (with the paper-style tables of `paper_tables`, conf/tools.yaml `report.paper_tables`) and PNG plots into
    `out`. Returns the written paths by name."""
    df = load_runs(root)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"Report directory '{out}' cannot be created ({e.strerror}); pass --out DIR.") from e
    paths = {
        "tidy_csv": out / "tidy.csv",
        "tidy_parquet": out / "tidy.parquet",
        "cells": out / "cells.csv",
        "effective_length": out / "effective_length.csv",
        "markdown": out / "report.md",
    }
    df.to_csv(paths["tidy_csv"], index=False)
    df.to_parquet(paths["tidy_parquet"], index=False)
    cells(df).to_csv(paths["cells"], index=False)
    effective_length(cells(df, CELL), threshold).to_csv(paths["effective_length"], index=False)
    paths["markdown"].write_text(markdown(df, threshold, paper_tables), encoding="utf-8")
    for p in plots(df, out):
        paths[p.stem] = p
    return paths
