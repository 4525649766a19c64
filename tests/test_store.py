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
