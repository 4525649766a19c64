"""Reports: tidy per-sample table from run directories, pivots, effective length, incomparable cells."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from infllm_eval.errors import UserError
from infllm_eval.commands.report import cells, effective_length, load_runs, write_report

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "results" / "smollm2-passkey"


def _rec(method, length, depth, i, score, status="ok", task="passkey", cell_key="c1", mem=2**20):
    sid = f"passkey-L{length}-d{depth:.2f}-{i}"
    return {
        "sample_id": sid,
        "key": f"{cell_key}-{sid}",
        "cell_key": cell_key,
        "model": "m",
        "method": method,
        "task": task,
        "length": length,
        "depth": depth,
        "score": score if status == "ok" else None,
        "status": status,
        "n_input_tokens": length,
        "prefill_s": 1.0,
        "decode_s": 0.5,
        "peak_mem_bytes": mem,
        "prediction": "12345",
        "answers": ["12345"],
    }


def make_run(
    root: Path,
    name: str,
    records: list[dict],
    *,
    cell_key="c1",
    task_fp="T1",
    profile="infllm",
    method_params=None,
) -> Path:
    d = root / name
    d.mkdir(parents=True)
    records = [
        {**r, "cell_key": cell_key, "key": f"{cell_key}-{r['sample_id']}"} if r["cell_key"] == "c1" else r
        for r in records
    ]
    (d / "config.yaml").write_text(yaml.safe_dump({"task": {"profile": profile}, "dtype": "auto", "seed": 0}))
    prov = {
        "cell_key": cell_key,
        "task_fingerprint": task_fp,
        "model_fingerprint": "M",
        "method": {"name": records[0]["method"], **(method_params or {})},
        "git": {"commit": "abc", "dirty": False},
        "generation": {"max_new_tokens": 32},
        "device": "cpu",
    }
    (d / "provenance.json").write_text(json.dumps(prov))
    (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return d


def test_committed_results_give_one_row_per_sample_with_provenance():
    if not (COMMITTED / "smollm2/infllm/passkey/samples.jsonl").exists():
        pytest.skip("committed SmolLM2 results not present")
    before = (COMMITTED / "smollm2/infllm/passkey/samples.jsonl").read_bytes()
    df = load_runs(COMMITTED)
    assert (COMMITTED / "smollm2/infllm/passkey/samples.jsonl").read_bytes() == before  # read-only
    infllm = df[(df.run_dir == "smollm2/infllm/passkey")]
    assert len(infllm) == 10 and infllm["sample_id"].is_unique
    assert infllm["score"].mean() == pytest.approx(0.9)  # the README's 90.0
    for col in (
        "git_commit",
        "task_fingerprint",
        "model_fingerprint",
        "prompt_profile",
        "device_name",
        "peak_mem_mb",
        "prefill_s",
        "n_input_tokens",
        "truncated",
        "method_params",
    ):
        assert infllm[col].notna().all(), col
    c = cells(df, ["model", "method", "task", "length"])
    full = c[(c.method == "full")].set_index("length")["score"]
    assert full[2048] == 100.0 and full[16384] == 0.0


def test_stale_records_torn_line_and_retries(tmp_path):
    recs = [
        _rec("full", 100, 0.5, 0, 0.0, cell_key="old"),  # an earlier config of the same run directory
        _rec("full", 100, 0.5, 0, None, status="error"),
        _rec("full", 100, 0.5, 0, 1.0),  # the retry after the error
        _rec("full", 100, 0.5, 1, 1.0),
    ]
    d = make_run(tmp_path, "m/full/passkey", recs)
    with open(d / "samples.jsonl", "a") as f:
        f.write('{"sample_id": "torn", "ke')
    size = (d / "samples.jsonl").stat().st_size
    df = load_runs(tmp_path)
    assert (d / "samples.jsonl").stat().st_size == size  # the torn tail is skipped, not truncated
    assert sorted(df["sample_id"]) == ["passkey-L100-d0.50-0", "passkey-L100-d0.50-1"]
    assert (df["status"] == "ok").all() and df["score"].sum() == 2.0


def test_failures_counted_separately_never_scored(tmp_path):
    recs = [
        _rec("full", 100, 0.5, 0, 1.0),
        _rec("full", 100, 0.5, 1, None, status="oom"),
        _rec("full", 100, 0.5, 2, None, status="timeout"),
        _rec("full", 100, 0.5, 3, None, status="error"),
    ]
    make_run(tmp_path, "r", recs)
    row = cells(load_runs(tmp_path)).iloc[0]
    assert (row.n, row.n_ok, row.n_oom, row.n_timeout, row.n_error, row.score) == (4, 1, 1, 1, 1, 100.0)


def test_incomparable_cells_are_flagged_not_averaged(tmp_path):
    make_run(tmp_path, "a", [_rec("full", 100, 0.5, 0, 1.0)], task_fp="T1")
    make_run(tmp_path, "b", [_rec("full", 100, 0.5, 0, 0.0)], task_fp="T2", cell_key="c2")
    make_run(tmp_path, "c", [_rec("infllm", 100, 0.5, 0, 1.0)], profile="official", cell_key="c3")
    paths = write_report(tmp_path, tmp_path / "rep", threshold=50)
    md = paths["markdown"].read_text()
    assert "Incomparable cells" in md and "task_fingerprint" in md
    c = pd.read_csv(paths["cells"])
    full = c[c.method == "full"]
    assert len(full) == 2 and not full["comparable"].any()  # one row per run, not one average
    assert sorted(full["score"]) == [0.0, 100.0] and sorted(full["run_dir"]) == ["a", "b"]
    assert (
        "incomparable" in md.split("length x method")[1] and "50.0" not in md
    )  # never the average of 100 and 0


def test_effective_length_is_longest_prefix_above_threshold(tmp_path):
    recs = []
    for length, scores in ((1000, [1, 1]), (2000, [1, 0]), (4000, [0, 0]), (8000, [1, 1])):
        recs += [_rec("infllm", length, 0.5, i, float(s)) for i, s in enumerate(scores)]
    make_run(tmp_path, "r", recs)
    eff = effective_length(cells(load_runs(tmp_path), ["model", "method", "task", "length"]), 50)
    assert eff.iloc[0]["effective_length"] == 2000  # 8000 passes again but 4000 already broke the run
    eff = effective_length(cells(load_runs(tmp_path), ["model", "method", "task", "length"]), 60)
    assert eff.iloc[0]["effective_length"] == 1000


def test_write_report_files_and_plots(tmp_path):
    recs = [
        _rec(m, L, d, 0, float(d < 0.9), mem=(2 if m == "infllm" else 1) * L * 2**10)
        for m in ("full", "infllm")
        for L in (1000, 2000)
        for d in (0.1, 0.5, 0.9)
    ]
    make_run(tmp_path, "full", [r for r in recs if r["method"] == "full"])
    make_run(tmp_path, "infllm", [r for r in recs if r["method"] == "infllm"], cell_key="c2")
    paths = write_report(tmp_path, tmp_path / "rep", threshold=50)
    tidy = pd.read_parquet(paths["tidy_parquet"])
    assert len(tidy) == 12 and len(pd.read_csv(paths["tidy_csv"])) == 12
    assert {
        "heatmap_m_full_passkey",
        "heatmap_m_infllm_passkey",
        "score_vs_length_m_passkey",
        "score_vs_cost_m_passkey",
    } <= set(paths)
    for name, p in paths.items():
        assert p.stat().st_size > 0, name
    assert paths["heatmap_m_full_passkey"].read_bytes()[:4] == b"\x89PNG"
    md = paths["markdown"].read_text()
    assert "| 1000 | 66.7 | 66.7 |" in md and "effective (>= 50)" in md


def test_cli_report_and_empty_root(tmp_path):
    import subprocess
    import sys

    make_run(tmp_path / "runs", "r", [_rec("full", 100, 0.5, 0, 1.0)])
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "infllm_eval.cli",
            "report",
            str(tmp_path / "runs"),
            "--out",
            str(tmp_path / "rep"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "| passkey | 100.0 |" in r.stdout and (tmp_path / "rep" / "tidy.csv").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="No run directories"):
        load_runs(tmp_path / "empty")
    shutil.rmtree(tmp_path / "rep")


def test_paper_tables_use_the_papers_columns_and_average_only_complete_rows(tmp_path):
    from infllm_eval.config import tool_defaults
    from infllm_eval.commands.report import paper_table

    spec = tool_defaults("report")["paper_tables"]["infbench"]
    cols = dict(spec["columns"])
    assert list(cols) == ["R.PK", "R.Num", "R.KV", "Choice", "QA", "Sum", "Math.F"]  # Table 1's order
    recs = []
    for j, task in enumerate(cols.values()):  # infllm: task j scores j/6 on its one sample; full lacks math_find
        recs.append({**_rec("infllm", 0, 0.5, 0, j / 6, task=task), "sample_id": f"{task}-0"})
        if task != "infbench_math_find":
            recs.append({**_rec("full", 0, 0.5, 0, 1.0, task=task), "sample_id": f"{task}-0"})
    make_run(tmp_path, "infllm", [r for r in recs if r["method"] == "infllm"])
    make_run(tmp_path, "full", [r for r in recs if r["method"] == "full"], cell_key="c2")  # keys differ by method
    t = paper_table(cells(load_runs(tmp_path), ["model", "method", "task"]), cols).set_index("method")
    assert t.loc["infllm", "R.KV"] == f"{100 * 2 / 6:.2f}" and t.loc["infllm", "Avg."] == "50.00"
    assert t.loc["full", "Math.F"] == "" and t.loc["full", "Avg."] == "n/a (1 missing)"
    write_report(tmp_path, tmp_path / "rep", 50, tool_defaults("report")["paper_tables"])
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "as InfLLM Table 1" in md and "as InfLLM Table 5" not in md  # no LongBench task ran
