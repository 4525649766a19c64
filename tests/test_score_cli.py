"""`infllm-eval score`: rescoring a LongBench / InfLLM predictions file or a run directory, no model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from infllm_eval.errors import UserError
from infllm_eval.commands.score import rescore_run, resolve_task, score_file
from infllm_eval.store import summarize, to_markdown

TREC = ["Abbreviation", "Entity", "Human being", "Location", "Numeric value"]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "infllm_eval.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def write_jsonl(path: Path, rows: list, blank_after_first: bool = False) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    if blank_after_first:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def trec_rows() -> list[dict]:
    return [
        {
            "pred": "Location\nHuman being",
            "answers": ["Location"],
            "all_classes": TREC,
            "length": 3000,
        },  # 1.0
        {"pred": "Entity", "answers": ["Location"], "all_classes": TREC, "length": 5000},  # 0.0
        {
            "pred": "Location or Human being",
            "answers": ["Location"],
            "all_classes": TREC,
            "length": 9000,
        },  # 0.5
    ]


# -- predictions files ---------------------------------------------------------------------------------------
def test_cli_scores_a_longbench_file_and_writes_per_sample_scores(tmp_path: Path) -> None:
    preds = write_jsonl(tmp_path / "trec.jsonl", trec_rows(), blank_after_first=True)
    r = cli("score", str(preds), "--per-sample", str(tmp_path / "scores.jsonl"))
    assert r.returncode == 0, r.stderr
    assert "trec (longbench_trec, 3 samples): 50.0" in r.stdout  # round(100 * 1.5 / 3, 2)
    rows = [json.loads(x) for x in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert rows == [{"line": 1, "score": 1.0}, {"line": 3, "score": 0.0}, {"line": 4, "score": 0.5}]


def test_task_names_with_and_without_prefix_and_longbench_e(tmp_path: Path) -> None:
    preds = write_jsonl(tmp_path / "preds.jsonl", trec_rows())
    assert score_file(preds, "trec").aggregate == score_file(preds, "longbench_trec").aggregate == 50.0
    e = score_file(preds, "trec_e")
    assert e.metric == "longbench_trec"
    assert e.buckets == {"0-4k": 100.0, "4-8k": 0.0, "8k+": 50.0}
    assert score_file(preds, "trec").buckets is None
    assert resolve_task("passkey") == ("infbench_passkey", False)
    assert resolve_task("longbench_trec_e") == ("longbench_trec", True)


def test_file_name_names_the_task_and_e_flag_splits(tmp_path: Path) -> None:
    preds = write_jsonl(tmp_path / "trec_e.jsonl", trec_rows())
    r = cli("score", str(preds))
    assert r.returncode == 0, r.stderr
    assert "longbench_trec" in r.stdout and "0-4k: 100.0  4-8k: 0.0  8k+: 50.0" in r.stdout


def test_infllm_infinitebench_files(tmp_path: Path) -> None:
    # InfLLM's pred.py writes choice answers as [option text, letter] and all_classes null
    debug = write_jsonl(
        tmp_path / "code_debug.jsonl",
        [
            {"pred": "B. func_b", "answers": ["func_b", "B"], "all_classes": None, "length": 10},  # 1
            {
                "pred": "The answer is B",
                "answers": ["func_b", "B"],
                "all_classes": None,
                "length": 10,
            },  # 0 official
        ],
    )
    assert score_file(debug).scores == [1.0, 0.0]
    assert score_file(debug, "code_debug_infllm").scores == [1.0, 1.0]  # InfLLM's "answer is" family
    kv = write_jsonl(
        tmp_path / "kv.jsonl",
        [
            {"pred": '"a1b2-c3".', "answers": ["a1b2-c3"]},
            {"pred": "a1b2-c3x", "answers": "a1b2-c3"},  # scalar wrapped
        ],
    )
    res = score_file(kv, "kv_retrieval")
    assert res.scores == [1.0, 0.0] and res.aggregate == 50.0
    choice = write_jsonl(
        tmp_path / "choice.jsonl",
        [
            {"pred": "C", "answers": ["Reading books"], "options": ["a", "b", "Reading books", "d"]},
        ],
    )
    assert score_file(choice, "infbench_longbook_choice_eng").aggregate == 100.0


@pytest.mark.parametrize(
    ("rows", "task", "needles"),
    [
        ([{"pred": "x", "answers": ["x"]}, '{"pred": "x", "answers"'], "trec", ["line 2", "not valid JSON"]),
        ([{"pred": "x", "answers": ["x"]}, {"pred": "x"}], "hotpotqa", ["line 2", "'answers'"]),
        ([{"answers": ["x"]}], "hotpotqa", ["line 1", "'pred'"]),
        ([{"pred": "x", "answers": ["x"], "all_classes": None}], "trec", ["line 1", "'all_classes'"]),
        ([{"pred": "C", "answers": ["Reading books"]}], "longbook_choice_eng", ["line 1", "'options'"]),
        ([{"pred": "x", "answers": ["x"]}], "trek", ["Did you mean 'trec'"]),
        ([{"pred": "x", "answers": ["x"], "all_classes": ["x"]}], "trec_e", ["line 1", "'length'"]),
        (["[1, 2]"], "trec", ["line 1", "not a JSON object"]),
    ],
)
def test_bad_files_are_one_sentence_errors(tmp_path: Path, rows: list, task: str, needles: list[str]) -> None:
    preds = write_jsonl(tmp_path / "preds.jsonl", rows)
    with pytest.raises(UserError) as info:
        score_file(preds, task)
    message = str(info.value)
    assert all(n in message for n in needles), message
    assert "\n" not in message


def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path) -> None:
    preds = write_jsonl(tmp_path / "hotpotqa.jsonl", [{"pred": "x", "answers": ["x"]}, {"pred": "x"}])
    r = cli("score", str(preds))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "line 2" in r.stderr and "'answers'" in r.stderr and "hotpotqa.jsonl" in r.stderr
    r = cli("score", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and "does not exist" in r.stderr


# -- run directories -----------------------------------------------------------------------------------------
def record(
    i: int, prediction: str | None, status: str = "ok", cell: str = "cell-1", score: float = 0.0
) -> dict:
    return {
        "sample_id": f"passkey-L100-d0.00-{i}",
        "length": 100,
        "depth": 0.0,
        "n_input_tokens": 100,
        "truncated": False,
        "n_dropped": 0,
        "prediction": prediction,
        "answers": ["12345"],
        "score": score if status == "ok" else None,
        "status": status,
        "error": None,
        "prefill_s": 0.5,
        "decode_s": 0.1,
        "new_tokens": 4,
        "peak_mem_bytes": 2**20,
        "model": "tiny",
        "method": "full",
        "task": "passkey",
        "key": f"k{i}",
        "cell_key": cell,
    }


def make_run(tmp_path: Path, records: list[dict], cell: str = "cell-1") -> Path:
    run = tmp_path / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("task:\n  name: passkey\n  definition: passkey\n  profile: infllm\n")
    (run / "provenance.json").write_text(json.dumps({"cell_key": cell}))
    write_jsonl(run / "samples.jsonl", records)
    return run


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_rescore_run_writes_elsewhere_and_never_changes_the_run(tmp_path: Path) -> None:
    stale = record(9, "12345", cell="old-cell")  # an earlier config's record: does not count, not rescored
    run = make_run(
        tmp_path,
        [record(0, "The pass key is 12345."), record(1, "54321"), record(2, None, status="error"), stale],
    )
    (run / "summary.csv").write_text("the run's own summary\n")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    metric, n, summary, out = rescore_run(run)
    assert (metric, n) == ("first_int_match", 2)  # from tasks/passkey.yaml
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # the run is untouched
    assert out == run / "rescored-first_int_match"
    records = _lines(out / "rescored.jsonl")
    assert [r["score"] for r in records] == [1.0, 0.0, None]
    assert [r.get("original_score") for r in records] == [0.0, 0.0, None]
    assert records[0]["metric"] == "first_int_match" and records[0]["prediction"] == "The pass key is 12345."
    assert summary[["n", "n_ok", "score"]].values.tolist() == [[3, 2, 50.0]]
    expected = summarize(records)
    assert (out / "summary.md").read_text() == to_markdown(expected)
    assert (out / "summary.csv").read_text() == expected.to_csv(index=False)


def test_rescore_run_with_another_metric_and_bad_records(tmp_path: Path) -> None:
    run = make_run(tmp_path, [record(0, "12345"), record(1, "The pass key is 12345.")])
    samples = (run / "samples.jsonl").read_bytes()
    metric, _, summary, out = rescore_run(run, task="exact_match", out=tmp_path / "em")
    assert metric == "exact_match" and summary["score"].tolist() == [50.0] and out == tmp_path / "em"
    assert (run / "samples.jsonl").read_bytes() == samples  # the run keeps its own metric's scores
    with pytest.raises(UserError, match="is a run directory"):
        rescore_run(run, out=run)  # never into a run directory
    bad = make_run(tmp_path / "b", [record(0, "12345"), {**record(1, "x"), "prediction": None}])
    with pytest.raises(UserError, match=r"samples.jsonl sample 'passkey-L100-d0.00-1' has no 'prediction'"):
        rescore_run(bad)
    assert not (bad / "rescored-first_int_match").exists()  # nothing written when a record cannot be scored
    with pytest.raises(UserError, match="not a run directory"):
        rescore_run(tmp_path)
    (bad / "samples.jsonl").unlink()
    with pytest.raises(UserError, match="no samples.jsonl"):
        rescore_run(bad)


def test_cli_rescores_a_run_directory_into_another_folder(tmp_path: Path) -> None:
    run = make_run(tmp_path, [record(0, "The pass key is 12345."), record(1, "no")])
    samples = (run / "samples.jsonl").read_bytes()
    r = cli("score", str(run), "--task", "infbench_passkey", "--out", str(tmp_path / "re"))
    assert r.returncode == 0, r.stderr
    assert "rescored 2 samples with infbench_passkey" in r.stdout and "unchanged" in r.stdout
    assert pd.read_csv(tmp_path / "re" / "summary.csv")["score"].tolist() == [50.0]
    assert (run / "samples.jsonl").read_bytes() == samples and not (run / "summary.csv").exists()
    for extra in (["--per-sample", str(tmp_path / "x.jsonl")], ["--e"], ["--out", str(run)]):
        r = cli("score", str(run), *extra)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    preds = write_jsonl(tmp_path / "trec.jsonl", trec_rows())
    r = cli("score", str(preds), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--per-sample" in r.stderr


def test_rescore_summary_counts_records_as_report_does(tmp_path: Path) -> None:
    # one rule for every reader (store.current_records): a finished sample is never replaced by a later failure
    # of the same key, and an earlier config's records are left out
    retry_failed = {**record(0, None, status="error"), "error": "oom on a retry"}
    run = make_run(tmp_path, [record(0, "12345"), retry_failed, record(1, "12345", cell="old-cell")])
    _, n, summary, _ = rescore_run(run)
    assert n == 1  # the finished record that counts; the earlier config's is not this run's result
    assert summary[["n", "n_ok", "n_error", "score"]].values.tolist() == [[1, 1, 0, 100.0]]
    from infllm_eval.store import load_runs

    tidy = load_runs(tmp_path)
    # report counts the same record, with the run's own score (rescored records live apart, never read as a run)
    assert tidy[["sample_id", "status", "score"]].values.tolist() == [["passkey-L100-d0.00-0", "ok", 0.0]]
