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
either side are reported. A drop beyond the tolerance that is not significant is shown as "not significant"
with its p-value, its number of pairs and about how many pairs would make a drop of that size significant.
`infllm-eval check` exits 1 when any cell is REGRESSION or NEW FAILURES; 2 (with the table printed and one
sentence) when a cell is incomparable or no cell could be compared at all, as for any other user error; else 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from infllm_eval.errors import UserError
from infllm_eval.store import CELL, FAILED, read_table, to_markdown

VERDICT_ORDER = ["REGRESSION", "NEW FAILURES", "incomparable", "not significant", "missing in results",
                 "new in results", "ok"]
FAILING = ("REGRESSION", "NEW FAILURES", "incomparable")
REGRESSING = ("REGRESSION", "NEW FAILURES")  # exit 1; an incomparable cell is a setup problem (exit 2)
COMPARED = ("ok", "REGRESSION", "NEW FAILURES", "not significant")


@dataclass
class GateResult:
    cells: pd.DataFrame  # one row per cell with verdict
    failed: bool

    @property
    def regressed(self) -> bool:
        """A real regression (exit 1): a cell dropped significantly, or samples that finished now fail."""
        return bool(self.cells["verdict"].isin(REGRESSING).any())

    def problem(self) -> str:
        """One sentence on why a gate that did not regress still failed ("" when it passed)."""
        if not self.failed or self.regressed:
            return ""
        bad = self.cells[self.cells["verdict"] == "incomparable"]
        if bad.empty:
            return "No cell of the results matches a baseline cell, so nothing was compared; check the baseline."
        first = bad.iloc[0]
        return (f"{len(bad)} cell(s) cannot be compared with the baseline ({first['model']}/{first['method']}/"
                f"{first['task']}@{first['length']}: {first['note']}).")

    def markdown(self) -> str:
        c = self.cells
        counts = c["verdict"].value_counts()
        head = (
            f"**{'FAIL' if self.failed else 'PASS'}**: {len(c)} cells; "
            + ", ".join(f"{counts[v]} {v}" for v in VERDICT_ORDER if v in counts)
            + "\n\n"
        )
        if not c["verdict"].isin(COMPARED).any():
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


def _numeric(df: pd.DataFrame, col: str, where: str) -> pd.Series:
    """`df[col]` as numbers; a value that is not a number is a UserError naming the table, column and value."""
    values = pd.to_numeric(df[col], errors="coerce")
    bad = df[col][values.isna() & df[col].notna()]
    if len(bad):
        raise UserError(f"{where} has a non-numeric {col} ({bad.iloc[0]!r}); pass a tidy table from `report`.")
    return values


def _normalize(df: pd.DataFrame, where: str = "the table") -> pd.DataFrame:
    df = df.copy()
    df["length"] = _numeric(df, "length", where).fillna(-1).astype("int64")
    df["depth"] = _numeric(df, "depth", where).round(6).fillna(-1.0)
    df["score"] = _numeric(df, "score", where)
    ok = df["status"] == "ok"
    if df.loc[ok, "score"].isna().any() or not df.loc[ok, "score"].between(0, 1).all():
        bad = df.loc[ok & ~df["score"].between(0, 1), "score"].iloc[0]
        raise UserError(f"{where} has a finished sample with score {bad!r}; per-sample scores are 0-1, as "
                        "`report`'s tidy table writes them.")
    df["sample_id"] = df["sample_id"].astype(str)
    return df


def validate_gate(tolerance: float, alpha: float, n_boot) -> None:
    """The gate's settings (command line or conf/tools.yaml `check:`), before any table is read."""
    if not 0 < alpha < 1:
        raise UserError(f"--alpha must be a significance level between 0 and 1 (e.g. 0.05); got {alpha}.")
    if not tolerance >= 0:  # also refuses NaN
        raise UserError(f"--tolerance must be >= 0 score points; got {tolerance}.")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise UserError(f"--bootstrap must be a positive number of resamples (e.g. 10000); got {n_boot!r}.")


def pairs_needed(base: np.ndarray, cur: np.ndarray, alpha: float) -> int | None:
    """About how many pairs would make this cell's drop significant at `alpha`, if the same share of pairs
    changed (McNemar: the discordant counts scaled up; other scores: the normal approximation of the paired
    mean, n = (z * sd / mean)^2). None when no number of pairs would (no drop, or no spread to scale)."""
    from scipy.stats import binomtest, norm

    n = len(base)
    if np.isin(base, (0.0, 1.0)).all() and np.isin(cur, (0.0, 1.0)).all():
        worse, better = int(((base == 1) & (cur == 0)).sum()), int(((base == 0) & (cur == 1)).sum())
        if worse <= better:
            return None
        size = n
        while size < 1000 * n:
            size = max(size + 1, int(size * 1.1))
            w, b = round(worse * size / n), round(better * size / n)
            if binomtest(w, w + b, 0.5, alternative="greater").pvalue < alpha:
                return size
        return None
    diff = base - cur
    if n < 2 or diff.mean() <= 0 or diff.std(ddof=1) == 0:
        return None
    return max(n + 1, int(np.ceil((norm.ppf(1 - alpha) * diff.std(ddof=1) / diff.mean()) ** 2)))


def _not_significant_note(drop: float, p: float, n: int, needed: int | None, alpha: float) -> str:
    more = (f"about {needed} pairs would make a drop this size significant at alpha {alpha:g}" if needed
            else "run more samples")
    return f"dropped by {drop:.2f} points, not significant (p = {p:.3g}) with n = {n} pairs; {more}"


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
    cur, base = _normalize(current, "the results"), _normalize(baseline, "the baseline")
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
    compared = out["verdict"].isin(COMPARED).any()
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
    dropped = bool(len(bs)) and drop > tolerance
    regressed = dropped and p < alpha
    verdict = "REGRESSION" if regressed else "NEW FAILURES" if new_fail and not allow_failures else "ok"
    unpaired = len(b) + len(c) - 2 * len(m)
    note = f"{unpaired} unpaired samples" if unpaired else ""
    if dropped and not regressed:  # never "nothing changed" for a drop beyond the tolerance
        verdict = "not significant" if verdict == "ok" else verdict
        why = _not_significant_note(drop, p, len(bs), pairs_needed(bs, cs, alpha), alpha)
        note = (note + "; " if note else "") + why
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
    validate_gate(tolerance, alpha, n_boot)
    return compare(
        _read(results, "results"),
        _read(baseline, "baseline"),
        tolerance=tolerance,
        alpha=alpha,
        n_boot=n_boot,
        seed=seed,
        allow_failures=allow_failures,
        by_depth=by_depth,
    )


def _read(path: str, role: str) -> pd.DataFrame:
    """`read_table`, with a file pandas cannot parse (empty, not CSV, corrupt Parquet) as one sentence."""
    from pathlib import Path

    try:
        return _normalize(read_table(path), f"{role} '{path}'")
    except (ValueError, OSError) as e:  # EmptyDataError, ParserError, UnicodeDecodeError, ArrowInvalid, ...
        if not Path(path).is_file():
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0].rstrip(".")
        raise UserError(f"Cannot read the {role} '{path}' as a tidy CSV / Parquet table ({reason}).") from None
