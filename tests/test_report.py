"""Reports: tidy per-sample table from run directories, pivots, effective length, incomparable cells."""

from __future__ import annotations

import json
import os
import shutil
import time
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


# -- report agrees with its runs (issue 24) ----------------------------------------------------------------------
def _set_task(run_dir: Path, **task) -> None:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["task"].update(task)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))


def _complete(run_dir: Path) -> None:
    (run_dir / "summary.csv").write_text("written last by the runner\n")


def test_one_sample_in_two_run_directories_is_one_row_and_the_fold_is_reported(tmp_path):
    recs = [_rec("full", 100, 0.5, i, 1.0) for i in range(3)]
    _complete(make_run(tmp_path, "a", recs))
    _complete(make_run(tmp_path, "b", [{**recs[0], "finished_at": "2026-01-02T00:00:00"},
                                        {**recs[1], "status": "error", "score": None}]))
    paths = write_report(tmp_path, tmp_path / "rep", threshold=50)
    tidy = pd.read_csv(paths["tidy_csv"])
    assert len(tidy) == 3 and tidy["key"].is_unique
    got = dict(zip(tidy["sample_id"], zip(tidy["run_dir"], tidy["status"])))
    assert got["passkey-L100-d0.50-0"] == ("b", "ok")  # the latest finished record
    assert got["passkey-L100-d0.50-1"] == ("a", "ok")  # a finished record beats a later failure
    md = paths["markdown"].read_text()
    assert "1 duplicate samples folded: the same content key in b (kept) and a" in md
    assert "1 duplicate samples folded: the same content key in a (kept) and b" in md
    assert pd.read_csv(paths["cells"]).iloc[0]["n"] == 3


def test_a_shrunk_grid_counts_only_its_samples_and_says_how_many_are_outside(tmp_path):
    recs = [_rec("full", L, d, i, 1.0) for L in (100, 200) for d in (0.0, 0.5) for i in range(2)]
    d = make_run(tmp_path, "r", recs)
    _set_task(d, lengths=[100, 200, 400], depths=[0.0, 0.5], samples=2)
    assert len(load_runs(tmp_path)) == 8
    _set_task(d, lengths=[200], depths=[0.5], samples=1)  # re-run with a smaller grid
    _complete(d)
    paths = write_report(tmp_path, tmp_path / "rep", threshold=50)
    tidy = pd.read_csv(paths["tidy_csv"])
    assert list(tidy["sample_id"]) == ["passkey-L200-d0.50-0"]
    assert "7 records outside the current grid" in paths["markdown"].read_text()
    assert len((d / "samples.jsonl").read_text().splitlines()) == 8  # kept on disk


def test_benchmark_limit_and_shard_select_the_first_rows(tmp_path):
    from infllm_eval.store import grid_split

    recs = [{"key": f"k{n}", "sample_id": f"t-row{n}", "length": 0, "meta": {"line": n}} for n in (2, 4, 6, 8)]
    inside, outside = grid_split(recs, {"task": {"limit": 2}})
    assert [r["key"] for r in inside] == ["k2", "k4"] and len(outside) == 2
    # shard 1/2 holds rows 1, 3, 5, 7: with limit 4 rows 1 and 3 count
    inside, _ = grid_split(recs, {"task": {"limit": 4}, "shard": "1/2"})
    assert [r["key"] for r in inside] == ["k2", "k4"]


def test_the_runner_summary_and_the_report_count_the_same_samples_after_the_grid_shrank(tmp_path):
    from infllm_eval import runner
    from infllm_eval.config import compose

    base = ["model=tiny-llama", "task.depths=[0.0]", "task.max_new_tokens=2", "progress=false",
            f"output_dir={tmp_path}", "run_name=r"]
    runner.run_cell(compose(base + ["task.lengths=[160,192]", "task.samples=2"]))
    summary = runner.run_cell(compose(base + ["task.lengths=[160]", "task.samples=1"]))
    tidy = load_runs(tmp_path)
    assert len(tidy) == summary["n"].sum() == 1
    assert (tidy["run_status"] == "complete").all()
    from infllm_eval.store import read_run

    assert len(read_run(tmp_path / "r").outside_grid) == 3


def test_interrupted_runs_and_unreadable_lines_are_flagged_in_report_and_tidy(tmp_path):
    recs = [_rec("full", 100, 0.5, i, 1.0) for i in range(3)]
    a = make_run(tmp_path, "a", recs)  # no summary: interrupted
    text = (a / "samples.jsonl").read_text().splitlines()
    (a / "samples.jsonl").write_text(text[0] + "\nnot json\n" + text[1] + "\n" + text[2][:20])  # corrupt + torn
    b = make_run(tmp_path, "b", [_rec("infllm", 100, 0.5, 0, 1.0)], cell_key="c2")
    _complete(b)
    paths = write_report(tmp_path, tmp_path / "rep", threshold=50)
    tidy = pd.read_csv(paths["tidy_csv"]).set_index("run_dir")
    assert set(tidy.loc["a", "run_status"]) == {"interrupted"} and set(tidy.loc["a", "run_corrupt_lines"]) == {2}
    assert tidy.loc["b", "run_status"] == "complete" and tidy.loc["b", "run_corrupt_lines"] == 0
    md = paths["markdown"].read_text()
    assert "1 interrupted runs" in md and "2 unreadable lines of a/samples.jsonl skipped (the last one torn" in md
    with open(b / "samples.jsonl", "a") as f:  # appended after its summary: no longer complete
        f.write(json.dumps({**_rec("infllm", 100, 0.5, 1, 1.0), "cell_key": "c2", "key": "c2-x"}) + "\n")
    os.utime(b / "samples.jsonl", ns=(time.time_ns() + 10**9,) * 2)
    assert set(load_runs(tmp_path)["run_status"]) == {"interrupted"}
    # a copy that did not keep file times: a summary whose n adds up to the samples that count is complete
    c = make_run(tmp_path / "copy", "c", [_rec("full", 100, 0.5, 0, 1.0)])
    (c / "summary.csv").write_text("model,n\nm,1\n")
    os.utime(c / "samples.jsonl", ns=(time.time_ns() + 10**9,) * 2)
    assert set(load_runs(tmp_path / "copy")["run_status"]) == {"complete"}


def test_unreadable_runs_are_listed_and_the_others_reported(tmp_path):
    import subprocess
    import sys

    _complete(make_run(tmp_path, "good", [_rec("full", 100, 0.5, 0, 1.0)]))
    (make_run(tmp_path, "badprov", [_rec("full", 100, 0.5, 0, 1.0)], cell_key="c2") / "provenance.json").write_text("{x")
    (make_run(tmp_path, "badcfg", [_rec("full", 100, 0.5, 0, 1.0)], cell_key="c3") / "config.yaml").write_text("- a\n")
    (make_run(tmp_path, "binary", [_rec("full", 100, 0.5, 0, 1.0)], cell_key="c4") / "config.yaml").write_bytes(b"\xff\xfe")
    (tmp_path / "nocfg").mkdir()
    (tmp_path / "nocfg" / "samples.jsonl").write_text(json.dumps(_rec("full", 100, 0.5, 0, 1.0)) + "\n")
    (tmp_path / "dead").mkdir()  # a run that stopped before its first sample
    (tmp_path / "dead" / ".lock").write_text("")
    r = subprocess.run([sys.executable, "-m", "infllm_eval.cli", "report", str(tmp_path), "--out",
                        str(tmp_path / "rep")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("warning: unreadable run") == 4
    md = (tmp_path / "rep" / "report.md").read_text()
    for name in ("badprov", "badcfg", "binary", "nocfg"):
        assert f"unreadable run {name}:" in md
    assert "dead" in md.split("interrupted runs")[1].splitlines()[0]
    assert list(pd.read_csv(tmp_path / "rep" / "tidy.csv")["run_dir"]) == ["good"]
    shutil.rmtree(tmp_path / "good")
    r = subprocess.run([sys.executable, "-m", "infllm_eval.cli", "report", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "4 unreadable" in r.stderr


def test_report_refuses_bad_out_and_threshold_without_touching_anything(tmp_path):
    d = make_run(tmp_path, "r", [_rec("full", 100, 0.5, 0, 1.0)])
    before = sorted(p.name for p in d.iterdir())
    with pytest.raises(UserError, match="is a run directory"):
        write_report(tmp_path, d, threshold=50)
    with pytest.raises(UserError, match="--threshold is a score"):
        write_report(tmp_path, tmp_path / "rep", threshold=150)
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="Cannot write the report"):
        write_report(tmp_path, tmp_path / "file", threshold=50)
    with pytest.raises(UserError, match="is not a directory"):
        write_report(tmp_path / "file", tmp_path / "rep", threshold=50)
    assert sorted(p.name for p in d.iterdir()) == before and not (tmp_path / "rep").exists()
    # the report's own outputs under ROOT are never read back as runs
    write_report(tmp_path, tmp_path / "report", threshold=50)
    assert len(write_report(tmp_path, tmp_path / "report", threshold=50)) and len(load_runs(tmp_path)) == 1


def test_plots_use_a_fixed_score_axis_legible_labels_and_a_readable_size(tmp_path, monkeypatch):
    from PIL import Image

    import infllm_eval.commands.report as report

    recs = [_rec(m, L, d, 0, 0.0) for m in ("full", "infllm", "streamingllm") for L in (1024, 2048, 4096)
            for d in (0.0, 0.5)]  # every score 0, every point at the same memory and time
    for k, m in enumerate(("full", "infllm", "streamingllm")):
        make_run(tmp_path, m, [r for r in recs if r["method"] == m], cell_key=f"c{k}")
    figs = {}
    real = report._save

    def keep(fig, path, layout=True):
        figs[path.stem] = fig
        fig.canvas.draw()
        boxes = [t.get_window_extent() for ax in fig.axes for t in ax.texts if ax.texts and "cost" in path.stem]
        figs[path.stem + ":boxes"] = boxes
        figs[path.stem + ":ylim"] = [ax.get_ylim() for ax in fig.axes if ax.get_ylabel() == "score"]
        return real(fig, path, layout)

    monkeypatch.setattr(report, "_save", keep)
    paths = write_report(tmp_path, tmp_path / "rep", threshold=50)
    for name in ("score_vs_cost_m_passkey", "score_vs_length_m_passkey", "heatmap_m_full_passkey"):
        assert Image.open(paths[name]).size[0] >= 600, name
    for name in ("score_vs_cost_m_passkey", "score_vs_length_m_passkey"):
        assert figs[name + ":ylim"] and all(lo <= 0 and 100 <= hi <= 110 for lo, hi in figs[name + ":ylim"])
    boxes = figs["score_vs_cost_m_passkey:boxes"]
    assert len(boxes) == 2 * 9  # a label per point, in both panels
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
