"""Run store: per-sample flush, torn lines, locking, failure isolation and resume through the runner."""

from __future__ import annotations

import json

import pytest

from infllm_eval.config import compose
from infllm_eval.errors import UserError
from infllm_eval.store import RunStore, summarize


def test_torn_last_line_is_dropped_and_truncated(tmp_path):
    with RunStore(tmp_path) as st:
        st.append({"key": "a", "status": "ok"})
        st.append({"key": "b", "status": "ok"})
    with open(tmp_path / "samples.jsonl", "a") as f:
        f.write('{"key": "c", "sta')  # a writer killed mid-line
    with RunStore(tmp_path) as st:
        assert set(st.finished()) == {"a", "b"}
        st.append({"key": "d", "status": "ok"})
        assert set(st.finished()) == {"a", "b", "d"}


def test_second_writer_is_refused(tmp_path):
    with RunStore(tmp_path):
        with pytest.raises(UserError, match="in use"):
            with RunStore(tmp_path):
                pass


def test_summary_counts_failures_separately_and_never_scores_them():
    recs = [
        dict(model="m", method="x", task="t", length=100, depth=0.5, status="ok", score=1.0, n_input_tokens=100,
             prefill_s=1.0, decode_s=0.1, peak_mem_bytes=10),
        dict(model="m", method="x", task="t", length=100, depth=0.5, status="error", score=None,
             n_input_tokens=None, prefill_s=None, decode_s=None, peak_mem_bytes=None),
        dict(model="m", method="x", task="t", length=100, depth=0.5, status="oom", score=None,
             n_input_tokens=None, prefill_s=None, decode_s=None, peak_mem_bytes=None),
    ]
    row = summarize(recs).iloc[0]
    assert (row.n, row.n_ok, row.n_error, row.n_oom, row.score) == (3, 1, 1, 1, 100.0)


def _cfg(tmp_path, *extra):
    return compose(["model=tiny-llama", "task.lengths=[160]", "task.depths=[0.0,0.5,1.0]", "progress=false",
                    f"output_dir={tmp_path}", *extra])


def test_failing_sample_is_recorded_and_run_goes_on(tmp_path, monkeypatch):
    from infllm_eval import runner
    from infllm_eval.engine import Engine

    real = Engine.generate
    calls = {"n": 0}

    def flaky(self, prompt, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real(self, prompt, *a, **k)

    monkeypatch.setattr(Engine, "generate", flaky)
    summary = runner.run_cell(_cfg(tmp_path))
    assert summary["n"].sum() == 3 and summary["n_error"].sum() == 1 and summary["n_ok"].sum() == 2
    recs = [json.loads(x) for x in (tmp_path / "tiny-llama/full/passkey/samples.jsonl").read_text().splitlines()]
    assert [r["status"] for r in recs].count("error") == 1 and "boom" in [r for r in recs if r["error"]][0]["error"]
    # resume: only the failed sample is retried
    monkeypatch.setattr(Engine, "generate", real)
    calls["n"] = 0
    counted = {"n": 0}

    def counting(self, prompt, *a, **k):
        counted["n"] += 1
        return real(self, prompt, *a, **k)

    monkeypatch.setattr(Engine, "generate", counting)
    summary = runner.run_cell(_cfg(tmp_path))
    assert counted["n"] == 1 and summary["n_ok"].sum() == 3 and summary["n_error"].sum() == 0


def _rec(key, status, cell="now", **extra):
    return {"key": key, "cell_key": cell, "sample_id": f"s-{key}", "status": status, **extra}


def test_current_records_are_the_current_configs_latest_finished_record_per_key(tmp_path):
    from infllm_eval.store import current_records, read_run

    recs = [
        _rec("a", "ok", cell="before"),  # an earlier config of the same run directory
        _rec("b", "error", n=0), _rec("b", "ok", n=1), _rec("b", "oom", n=2),  # never replaced by a failure
        _rec("c", "error", n=0), _rec("c", "timeout", n=1),  # no finished record: the latest failure
        _rec("d", "ok", n=0), _rec("d", "ok", n=1),  # later lines win
    ]
    got = {r["key"]: (r["status"], r["n"]) for r in current_records(recs, {"cell_key": "now"}, {})}
    assert got == {"b": ("ok", 1), "c": ("timeout", 1), "d": ("ok", 1)}
    # the run directory reader applies the same rule; the writer's resume sees the same finished records
    with RunStore(tmp_path) as st:
        st.start("run_name: x\n", {"cell_key": "now"})
        for r in recs:
            st.append(r)
        finished = st.finished()
    run = read_run(tmp_path)
    assert run.config == {"run_name": "x"} and run.provenance == {"cell_key": "now"}
    assert {r["key"]: r["n"] for r in run.records} == {"b": 1, "c": 1, "d": 1}
    assert {k: r.get("n") for k, r in finished.items()} == {"a": None, "b": 1, "d": 1}


def test_records_of_runs_without_cell_key_are_matched_by_their_recomputed_key():
    from infllm_eval.store import content_key, current_records

    prov = {"versions": {"infllm-eval": "0.1"}, "model_fingerprint": "M", "method": {"name": "full"},
            "task_fingerprint": "T", "generation": {"max_new_tokens": 8}, "device": "cpu"}
    base = {"harness": "0.1", "model": "M", "method": {"name": "full"}, "task": "T",
            "generation": {"max_new_tokens": 8}, "device": "cpu", "dtype": "torch.float32"}
    mine = {"key": content_key(base, "s1"), "sample_id": "s1", "status": "ok"}
    stale = {"key": content_key({**base, "task": "T0"}, "s2"), "sample_id": "s2", "status": "ok"}
    assert current_records([mine, stale], prov, {"dtype": "float32"}) == [mine]
    foreign = current_records([stale], prov, {"dtype": "float32"})  # nothing re-derivable: latest per sample
    assert [(r["sample_id"], r["_unverified"]) for r in foreign] == [("s2", True)]


def test_unreadable_provenance_is_a_user_error(tmp_path):
    from infllm_eval.store import read_run

    (tmp_path / "config.yaml").write_text("run_name: x\n")
    (tmp_path / "samples.jsonl").write_text("")
    (tmp_path / "provenance.json").write_text("{not json")
    with pytest.raises(UserError, match="provenance.json' is not valid JSON"):
        read_run(tmp_path)



def test_run_target_names_the_shard_directory_that_merge_finds(tmp_path):
    from infllm_eval.runner import run_target
    from infllm_eval.store import SHARD_DIR

    whole = run_target(_cfg(tmp_path, "run_name=r"))
    assert (whole.dir, whole.shard) == (tmp_path / "r", None)
    part = run_target(_cfg(tmp_path, "run_name=r", "shard=1/3"))
    assert (part.dir, part.shard) == (tmp_path / "r-shard1of3", (1, 3))
    m = SHARD_DIR.match(part.dir.name)
    assert (m["base"], m["i"], m["n"]) == ("r", "1", "3")


def test_read_samples_lists_every_line_it_cannot_use_and_never_modifies_the_file(tmp_path):
    from infllm_eval.store import read_samples

    good = json.dumps({"key": "a", "status": "ok", "score": 1.0})
    text = "\n".join([good, "not json", "[1, 2]", '{"key": "b", "score": "high"}', "", good[:9]])
    (tmp_path / "samples.jsonl").write_text(text)
    got = read_samples(tmp_path / "samples.jsonl")
    assert [r["key"] for r in got.records] == ["a"] and got.bad_lines == [2, 3, 4, 6] and got.torn
    assert (tmp_path / "samples.jsonl").read_text() == text
    assert read_samples(tmp_path / "missing.jsonl").records == []
