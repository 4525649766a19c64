"""Regression gate: compare results with a per-sample baseline cell by cell, with a paired significance test.

A cell is (model, method, task, length) or, with `by_depth`, also depth. Within a cell, samples are paired by
`sample_id` (only pairs finished in both). A cell *regresses* when its paired score drops by more than
`tolerance` points AND the drop is significant at `alpha` (one-sided):
- 0/1 scores: exact McNemar test, i.e. a binomial test on the discordant pairs (baseline right / now wrong vs
  baseline wrong / now right) with p = 0.5 (`scipy.stats.binomtest`);
- other scores: a seeded paired bootstrap of the mean per-sample difference.

Samples that now fail (error / oom / timeout) but finished in the baseline fail the gate unless allowed: a
failure must never pass silently by shrinking the paired set. Cells whose task / prompt differ (task
fingerprint or prompt profile) are not compared and fail the gate (regenerate the baseline); cells missing on
either side are reported. `infllm-eval check` exits 1 when any cell is REGRESSION, NEW FAILURES or
incomparable, or when no cell could be compared at all; else 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from infllm_eval.store import CELL, FAILED, read_table, to_markdown

VERDICT_ORDER = ["REGRESSION", "NEW FAILURES", "incomparable", "missing in results", "new in results", "ok"]
FAILING = ("REGRESSION", "NEW FAILURES", "incomparable")


@dataclass
class GateResult:
    cells: pd.DataFrame  # one row per cell with verdict
    failed: bool

    def markdown(self) -> str:
        c = self.cells
        counts = c["verdict"].value_counts()
        head = (
            f"**{'FAIL' if self.failed else 'PASS'}**: {len(c)} cells; "
            + ", ".join(f"{counts[v]} {v}" for v in VERDICT_ORDER if v in counts)
            + "\n\n"
        )
        if not c["verdict"].isin(["ok", "REGRESSION", "NEW FAILURES"]).any():
            head += "No cell of the results matches a baseline cell: nothing was compared.\n\n"
        if "changed_predictions" in c and c["changed_predictions"].fillna(0).sum():
            head += (
                f"{int(c['changed_predictions'].fillna(0).sum())} paired samples changed their prediction "
                "(information; only scores gate).\n\n"
            )
        shown = c[c["verdict"] != "ok"]
        if shown.empty:
            return head + "No cell changed beyond the tolerance.\n"
        cols = [k for k in CELL + ["depth"] if k in shown.columns] + [
            "verdict",
            "n_pairs",
            "baseline",
            "current",
            "drop",
            "test",
            "p_value",
            "new_failures",
            "note",
        ]
        return head + to_markdown(shown.reindex(columns=cols), _fmt)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 0.01 else f"{v:.2f}"
    return str(v)


def _normalize(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["length"] = pd.to_numeric(df["length"]).fillna(-1).astype("int64")
    df["depth"] = pd.to_numeric(df["depth"]).round(6).fillna(-1.0)
    df["sample_id"] = df["sample_id"].astype(str)
    return df


def paired_test(base: np.ndarray, cur: np.ndarray, n_boot: int, seed: int) -> tuple[str, float]:
    """One-sided p-value that `cur` is worse than `base` (paired, same order)."""
    from scipy.stats import binomtest

    if len(base) == 0:
        return "none", float("nan")
    if np.isin(base, (0.0, 1.0)).all() and np.isin(cur, (0.0, 1.0)).all():
        worse = int(((base == 1) & (cur == 0)).sum())
        better = int(((base == 0) & (cur == 1)).sum())
        if worse + better == 0:
            return "mcnemar", 1.0
        return "mcnemar", float(binomtest(worse, worse + better, 0.5, alternative="greater").pvalue)
    diff = base - cur
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(axis=1)
    return "bootstrap", float(((means <= 0).sum() + 1) / (n_boot + 1))


def compare(
    current: pd.DataFrame,
    baseline: pd.DataFrame,
    *,
    tolerance: float,
    alpha: float,
    n_boot: int,
    seed: int,
    allow_failures: bool,
    by_depth: bool = False,
) -> GateResult:
    cur, base = _normalize(current), _normalize(baseline)
    keys = CELL + (["depth"] if by_depth else [])
    cur_groups = dict(list(cur.groupby(keys)))
    base_groups = dict(list(base.groupby(keys)))
    rows = []
    for key in sorted(set(cur_groups) | set(base_groups)):
        row = dict(zip(keys, key))
        b, c = base_groups.get(key), cur_groups.get(key)
        if b is None or c is None:
            side, only = ("baseline", b) if c is None else ("results", c)
            row.update(
                verdict="missing in results" if c is None else "new in results",
                note=f"{len(only)} samples only in the {side}",
            )
            rows.append(row)
            continue
        row.update(_compare_cell(b, c, tolerance, alpha, n_boot, seed, allow_failures))
        rows.append(row)
    out = pd.DataFrame(rows)
    if by_depth and "depth" in out:
        out["depth"] = out["depth"].where(out["depth"] >= 0, None)
    out["_order"] = out["verdict"].map(VERDICT_ORDER.index)
    out = out.sort_values(["_order"] + keys, kind="stable").drop(columns="_order").reset_index(drop=True)
    compared = out["verdict"].isin(["ok", "REGRESSION", "NEW FAILURES"]).any()
    failed = bool(out["verdict"].isin(FAILING).any()) or not compared  # nothing in common vouches for nothing
    return GateResult(out, failed)


def _compare_cell(b: pd.DataFrame, c: pd.DataFrame, tolerance, alpha, n_boot, seed, allow_failures) -> dict:
    for col in ("task_fingerprint", "prompt_profile"):
        if col in b.columns and col in c.columns:
            bv, cv = set(b[col].dropna().astype(str)), set(c[col].dropna().astype(str))
            if bv and cv and bv != cv:
                return {"verdict": "incomparable", "note": f"{col} differs; regenerate the baseline"}
    for name, side in (("baseline", b), ("results", c)):
        if side["sample_id"].duplicated().any():
            return {"verdict": "incomparable", "note": f"duplicate sample_id in the {name} (several runs?)"}
    m = b.merge(c, on="sample_id", suffixes=("_b", "_c"))
    new_fail = int(((m["status_b"] == "ok") & m["status_c"].isin(FAILED)).sum())
    pairs = m[(m["status_b"] == "ok") & (m["status_c"] == "ok")]
    bs, cs = pairs["score_b"].to_numpy(float), pairs["score_c"].to_numpy(float)
    base_score = 100 * bs.mean() if len(bs) else float("nan")
    cur_score = 100 * cs.mean() if len(cs) else float("nan")
    drop = base_score - cur_score if len(bs) else float("nan")
    test, p = paired_test(bs, cs, n_boot, seed)
    regressed = bool(len(bs)) and drop > tolerance and p < alpha
    verdict = "REGRESSION" if regressed else "NEW FAILURES" if new_fail and not allow_failures else "ok"
    unpaired = len(b) + len(c) - 2 * len(m)
    note = f"{unpaired} unpaired samples" if unpaired else ""
    changed = 0
    if "prediction_b" in pairs and "prediction_c" in pairs:
        changed = int(
            (
                pairs["prediction_b"].fillna("").astype(str) != pairs["prediction_c"].fillna("").astype(str)
            ).sum()
        )
    if new_fail:
        kinds = sorted(set(m.loc[(m["status_b"] == "ok") & m["status_c"].isin(FAILED), "status_c"]))
        note = (note + "; " if note else "") + f"{new_fail} samples now fail ({', '.join(kinds)})"
    return {
        "verdict": verdict,
        "n_pairs": len(pairs),
        "baseline": base_score,
        "current": cur_score,
        "drop": drop,
        "test": test,
        "p_value": p,
        "new_failures": new_fail,
        "changed_predictions": changed,
        "note": note,
    }


def check(
    results: str,
    baseline: str,
    *,
    tolerance: float,
    alpha: float,
    n_boot: int,
    seed: int,
    allow_failures: bool,
    by_depth: bool = False,
) -> GateResult:
    """`results`: a run root or a tidy table; `baseline`: a tidy per-sample table (CSV or Parquet)."""
    return compare(
        read_table(results),
        read_table(baseline),
        tolerance=tolerance,
        alpha=alpha,
        n_boot=n_boot,
        seed=seed,
        allow_failures=allow_failures,
        by_depth=by_depth,
    )
