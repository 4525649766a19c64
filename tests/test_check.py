"""Regression gate: paired tests per cell, planted regressions, failures, missing cells, the baseline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from infllm_eval.commands.check import compare, paired_test

REPO = Path(__file__).resolve().parent.parent
BASELINES = REPO / "results" / "baselines"
BASELINE = BASELINES / "tiny-passkey"
GATE = {"tolerance": 2.0, "alpha": 0.05, "n_boot": 2000, "seed": 0, "allow_failures": False}


def table(scores: dict[tuple[str, int], list], status: dict | None = None) -> pd.DataFrame:
    """scores[(method, length)] = per-sample scores -> a tidy table (model m, task passkey, depth 0.5)."""
    rows = []
    for (method, length), vals in scores.items():
        for i, v in enumerate(vals):
            st = (status or {}).get((method, length, i), "ok")
            rows.append(
                {
                    "model": "m",
                    "method": method,
                    "task": "passkey",
                    "length": length,
                    "depth": 0.5,
                    "sample_id": f"s{i}",
                    "score": v if st == "ok" else None,
                    "status": st,
                    "task_fingerprint": "T",
                    "prompt_profile": "infllm",
                    "prediction": str(v),
                }
            )
    return pd.DataFrame(rows)


def test_unchanged_results_pass():
    base = table({("full", 100): [1, 0, 1, 1, 0, 1], ("infllm", 100): [1] * 6})
    res = compare(base, base, **GATE)
    assert not res.failed and set(res.cells["verdict"]) == {"ok"} and "PASS" in res.markdown()


def test_planted_regression_fails_and_names_the_cell():
    base = table({("full", 100): [1] * 8, ("infllm", 100): [1] * 8})
    cur = table({("full", 100): [1] * 8, ("infllm", 100): [1, 1, 0, 0, 0, 0, 0, 0]})
    res = compare(cur, base, **GATE)
    assert res.failed
    bad = res.cells[res.cells["verdict"] == "REGRESSION"]
    assert list(bad["method"]) == ["infllm"] and bad.iloc[0]["test"] == "mcnemar"
    assert bad.iloc[0]["p_value"] == pytest.approx(0.5**6)  # 6 discordant pairs, all worse
    md = res.markdown()
    assert "FAIL" in md and "| m | infllm | passkey | 100 | REGRESSION |" in md and "| full |" not in md


def test_drop_within_tolerance_or_not_significant_passes():
    base = table({("full", 100): [1, 1]})
    cur = table({("full", 100): [1, 0]})  # 50 points, but one discordant pair: p = 0.5
    res = compare(cur, base, **GATE)
    assert not res.failed and res.cells.iloc[0]["p_value"] == pytest.approx(0.5)
    big = table({("full", 100): [1] * 100})
    one_less = table({("full", 100): [1] * 99 + [0]})
    assert not compare(one_less, big, **GATE).failed  # 1 point < tolerance 2
    assert compare(one_less, big, **{**GATE, "tolerance": 0.5}).failed is False  # p = 0.5: not significant


def test_non_binary_scores_use_paired_bootstrap():
    rng = np.random.default_rng(1)
    b = rng.uniform(0.5, 1.0, 40)
    test, p = paired_test(b, b - 0.2, n_boot=2000, seed=0)
    assert test == "bootstrap" and p < 0.01
    test, p = paired_test(b, b + 0.01, n_boot=2000, seed=0)
    assert p > 0.5
    assert paired_test(b, b - 0.2, 2000, 0) == paired_test(b, b - 0.2, 2000, 0)  # seeded


def test_new_failures_and_missing_cells_are_reported():
    base = table({("full", 100): [1] * 4, ("full", 200): [1] * 4})
    cur = table({("full", 100): [1] * 4, ("infllm", 100): [1] * 4}, status={("full", 100, 3): "oom"})
    res = compare(cur, base, **GATE)
    v = res.cells.set_index(["method", "length"])["verdict"]
    assert v[("full", 100)] == "NEW FAILURES" and v[("full", 200)] == "missing in results"
    assert v[("infllm", 100)] == "new in results" and res.failed
    assert "oom" in res.markdown()
    assert not compare(cur, base, **{**GATE, "allow_failures": True}).failed


def test_nothing_in_common_fails_instead_of_passing_vacuously():
    res = compare(table({("full", 100): [1] * 4}), table({("full", 200): [1] * 4}), **GATE)
    assert res.failed and "nothing was compared" in res.markdown()
    assert "| m | full | passkey | 200 | missing in results |" in res.markdown()


def test_different_task_fingerprint_is_incomparable():
    base = table({("full", 100): [1] * 4})
    cur = base.assign(task_fingerprint="other")
    res = compare(cur, base, **GATE)
    assert res.failed and res.cells.iloc[0]["verdict"] == "incomparable"


def _cli(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "infllm_eval.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def _baseline_args(base: Path) -> list[str]:
    """The overrides of a committed baseline sweep (NAME.args: one per line, # comments), as regression.sh reads them."""
    return [a for a in base.with_suffix(".args").read_text().splitlines() if a.strip() and not a.startswith("#")]


def test_tiny_sweep_matches_committed_baseline(tmp_path):
    """The CPU regression: runners/regression.sh's 2 x 2 tiny-model sweep against its committed baseline."""
    r = _cli("run", "-m", *_baseline_args(BASELINE), f"output_dir={tmp_path / 'runs'}")
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli("check", str(tmp_path / "runs"), "--baseline", str(BASELINE.with_suffix(".csv")))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout and "4 ok" in r.stdout
    # the same results against a baseline with one planted regression: exit 1, the cell named
    planted = pd.read_csv(BASELINE.with_suffix(".csv"))
    cell = (planted["model"] == "tiny-qwen2") & (planted["method"] == "lminfinite")
    planted.loc[cell, "score"] = 1.0
    planted.to_csv(tmp_path / "planted.csv", index=False)
    r = _cli("check", str(tmp_path / "runs"), "--baseline", str(tmp_path / "planted.csv"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "| tiny-qwen2 | lminfinite | passkey | 256 | REGRESSION |" in r.stdout
    assert "tiny-llama" not in r.stdout


@pytest.mark.slow
def test_smollm2_infllm_cell_matches_committed_baseline(tmp_path):
    """The real embedded model through InfLLM's retrieval (runners/regression.sh's second baseline)."""
    base = BASELINES / "smollm2-infllm-passkey"
    r = _cli("run", "-m", *_baseline_args(base), f"output_dir={tmp_path / 'runs'}")
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli("check", str(tmp_path / "runs"), "--baseline", str(base.with_suffix(".csv")))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout and "1 ok" in r.stdout
    # the committed baseline is a real signal: the needle comes back from memory in every sample
    assert pd.read_csv(base.with_suffix(".csv"))["score"].tolist() == [1.0, 1.0, 1.0, 1.0]


# -- issue 24: say what happened to a drop; settings and unreadable tables are user errors (exit 2) --------------
def test_a_drop_beyond_tolerance_without_significance_is_said_with_p_n_and_pairs_needed():
    base = table({("full", 100): [1] * 9})
    cur = table({("full", 100): [1] * 7 + [0, 0]})  # 22 points down, 2 discordant pairs: p = 0.25
    res = compare(cur, base, **GATE)
    cell = res.cells.iloc[0]
    assert not res.failed and not res.regressed and cell["verdict"] == "not significant"
    md = res.markdown()
    assert "No cell changed" not in md
    assert "dropped by 22.22 points, not significant (p = 0.25) with n = 9 pairs" in md
    # 2 of 9 pairs worse: 5 of 22 is the first scaled count with p < 0.05 (0.5 ** 5 = 0.031)
    assert "about 22 pairs would make a drop this size significant at alpha 0.05" in md


def test_pairs_needed_for_bootstrap_scores_follows_the_normal_approximation():
    from infllm_eval.commands.check import pairs_needed

    base = np.array([0.5, 0.6, 0.7, 0.8])
    cur = base - np.array([0.1, 0.0, 0.2, -0.1])  # mean drop 0.05, sd 0.129
    assert pairs_needed(base, cur, 0.05) == 19  # ceil((1.645 * 0.129 / 0.05) ** 2)
    assert pairs_needed(base, base + 0.1, 0.05) is None  # no drop


@pytest.mark.parametrize("option,value,needle", [
    ("--alpha", "0", "--alpha must be"), ("--alpha", "1.5", "--alpha must be"),
    ("--tolerance", "-1", "--tolerance must be"), ("--bootstrap", "0", "--bootstrap must be"),
])
def test_gate_settings_are_validated(tmp_path, option, value, needle):
    path = tmp_path / "t.csv"
    table({("full", 100): [1, 0]}).to_csv(path, index=False)
    r = _cli("check", str(path), "--baseline", str(path), option, value)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def _bad_tables(tmp_path) -> dict:
    good = table({("full", 100): [1, 0]})
    (tmp_path / "empty.csv").write_text("")
    good.assign(length="abc").to_csv(tmp_path / "length.csv", index=False)
    good.assign(score=["x", "1"]).to_csv(tmp_path / "score.csv", index=False)
    good.assign(score=[100.0, 0.0]).to_csv(tmp_path / "percent.csv", index=False)
    (tmp_path / "corrupt.parquet").write_bytes(b"not parquet")
    good.drop(columns="task").to_csv(tmp_path / "column.csv", index=False)
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00\x81")
    return {"empty.csv": "Cannot read the baseline", "length.csv": "non-numeric length",
            "score.csv": "non-numeric score", "percent.csv": "scores are 0-1", "corrupt.parquet": "Cannot read",
            "column.csv": "no column task", "binary.csv": "Cannot read", "missing.csv": "does not exist"}


def test_an_unreadable_baseline_is_exit_2_one_sentence_never_a_regression(tmp_path):
    good = tmp_path / "good.csv"
    table({("full", 100): [1, 0]}).to_csv(good, index=False)
    for name, needle in _bad_tables(tmp_path).items():
        r = _cli("check", str(good), "--baseline", str(tmp_path / name))
        assert r.returncode == 2, (name, r.stderr)
        assert needle in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, (name, r.stderr)


def test_nothing_comparable_is_exit_2_a_regression_exit_1(tmp_path):
    a, b, worse = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "worse.csv"
    table({("full", 100): [1] * 8}).to_csv(a, index=False)
    table({("full", 200): [1] * 8}).to_csv(b, index=False)  # another grid: nothing in common
    table({("full", 100): [0] * 8}).to_csv(worse, index=False)
    r = _cli("check", str(a), "--baseline", str(b))
    assert r.returncode == 2 and "nothing was compared" in r.stderr and "missing in results" in r.stdout
    r = _cli("check", str(a), "--baseline", str(a.with_name("a.csv")))
    assert r.returncode == 0 and "PASS" in r.stdout
    r = _cli("check", str(worse), "--baseline", str(a))
    assert r.returncode == 1 and "REGRESSION" in r.stdout
    table({("full", 100): [1] * 8}).assign(task_fingerprint="other").to_csv(b, index=False)
    r = _cli("check", str(a), "--baseline", str(b))
    assert r.returncode == 2 and "task_fingerprint differs" in r.stderr
