"""Crash safety and resume: SIGKILL at random points, timeouts, semantic vs cosmetic config changes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from infllm_eval import runner
from infllm_eval.config import compose
from infllm_eval.engine import Engine
from infllm_eval.commands.report import load_runs

SWEEP = [
    "model=tiny-llama",
    "method=full,streamingllm",
    "task.lengths=[256]",
    "task.depths=[0.0,0.5,1.0]",
    "task.samples=4",
    "task.max_new_tokens=16",
    "progress=false",
]
COLS = ["model", "method", "task", "length", "depth", "sample_id", "key", "status", "score", "prediction"]


def _start(out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "infllm_eval.cli", "run", "-m", *SWEEP, f"output_dir={out}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _lines(out: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in out.rglob("samples.jsonl"))


def _table(out: Path):
    return load_runs(out)[COLS].sort_values(["method", "sample_id"]).reset_index(drop=True)


def test_sigkill_at_random_points_then_resume_equals_uninterrupted_run(tmp_path):
    n_total = 2 * 3 * 4  # methods x depths x samples in SWEEP
    for method in ("full", "streamingllm"):  # the uninterrupted reference, in-process (same cells as SWEEP)
        runner.run_cell(
            compose(
                [o if not o.startswith("method=") else f"method={method}" for o in SWEEP]
                + [f"output_dir={tmp_path / 'ref'}"]
            )
        )
    # The kill lands a random fraction of one sample's duration after the target line, measured on this machine,
    # so a fast machine does not finish the sweep between the target and the kill.
    ref = [json.loads(x) for p in (tmp_path / "ref").rglob("samples.jsonl") for x in p.read_text().splitlines()]
    t_sample = sum(r["prefill_s"] + r["decode_s"] for r in ref) / len(ref)
    rng = random.Random(int(os.environ.get("KILL_SEED", "0")))
    out, kills = tmp_path / "killed", 0
    for _ in range(3):
        proc = _start(out)
        target = _lines(out) + rng.randint(1, 3)
        deadline = time.time() + 300
        while _lines(out) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(min(0.01, t_sample / 4))
        time.sleep(rng.uniform(0, t_sample))  # somewhere inside the next sample (or its write)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills == 3 and _lines(out) < n_total  # the sweep was really cut short three times
    final = subprocess.run(
        [sys.executable, "-m", "infllm_eval.cli", "run", "-m", *SWEEP, f"output_dir={out}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert final.returncode == 0, final.stderr[-2000:]
    got, want = _table(out), _table(tmp_path / "ref")
    assert len(want) == n_total and got.equals(want)  # no lost, duplicated or different samples
    for path in out.rglob("samples.jsonl"):  # every key finished exactly once; no torn line left behind
        recs = [json.loads(line) for line in path.read_text().splitlines()]
        ok = Counter(r["key"] for r in recs if r["status"] == "ok")
        assert set(ok.values()) == {1} and len(ok) == n_total // 2, path
        assert (path.parent / "summary.csv").exists()


def _cfg(tmp_path, *extra):
    return compose(
        [
            "model=tiny-llama",
            "task.lengths=[160]",
            "task.depths=[0.0,1.0]",
            "task.max_new_tokens=4",
            "progress=false",
            f"output_dir={tmp_path}",
            *extra,
        ]
    )


def _count_generate(monkeypatch) -> dict:
    real, calls = Engine.generate, {"n": 0}

    def counting(self, *a, **k):
        calls["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(Engine, "generate", counting)
    return calls


def test_semantic_change_recomputes_cosmetic_change_reuses(tmp_path, monkeypatch):
    calls = _count_generate(monkeypatch)
    runner.run_cell(_cfg(tmp_path))
    assert calls["n"] == 2
    for cosmetic in (["progress=true"], ["sample_timeout_s=1000"]):
        calls["n"] = 0
        runner.run_cell(_cfg(tmp_path, *cosmetic))
        assert calls["n"] == 0, cosmetic
    for semantic in (
        ["seed=1"],
        ["chunk_size=64"],
        ["method.params.base=20000.0"],
        ["task.max_new_tokens=5"],
        ["dtype=bfloat16"],
    ):
        calls["n"] = 0
        summary = runner.run_cell(_cfg(tmp_path, *semantic))
        assert calls["n"] == 2 and summary["n"].sum() == 2, semantic
    # the report shows only the records of the directory's current config (the last one run)
    df = load_runs(tmp_path)
    assert len(df) == 2 and set(df["dtype"]) == {"bfloat16"}


def test_timeout_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    real, calls = Engine.prefill, {"n": 0}

    def slow_second(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            time.sleep(2.5)
        return real(self, *a, **k)

    monkeypatch.setattr(Engine, "prefill", slow_second)
    summary = runner.run_cell(_cfg(tmp_path, "sample_timeout_s=2", "task.depths=[0.0,0.5,1.0]"))
    assert (summary["n_timeout"].sum(), summary["n_ok"].sum(), summary["n_error"].sum()) == (1, 2, 0)
    recs = [
        json.loads(x) for x in (tmp_path / "tiny-llama/full/passkey/samples.jsonl").read_text().splitlines()
    ]
    timed_out = [r for r in recs if r["status"] == "timeout"]
    assert len(timed_out) == 1 and timed_out[0]["score"] is None and "2 s" in timed_out[0]["error"]
    # resume retries only the timed-out sample
    calls["n"] = 10
    summary = runner.run_cell(_cfg(tmp_path, "sample_timeout_s=2", "task.depths=[0.0,0.5,1.0]"))
    assert calls["n"] == 11 and summary["n_ok"].sum() == 3 and summary["n_timeout"].sum() == 0


def test_shards_split_the_samples_and_the_report_merges_them(tmp_path):
    for i in range(2):
        runner.run_cell(_cfg(tmp_path, f"shard={i}/2", "task.depths=[0.0,0.5,1.0]"))
    runner.run_cell(_cfg(tmp_path / "whole", "task.depths=[0.0,0.5,1.0]"))
    shards = load_runs(tmp_path / "tiny-llama")
    assert sorted(shards["run_dir"].unique()) == ["full/passkey-shard0of2", "full/passkey-shard1of2"]
    whole = load_runs(tmp_path / "whole")
    cols = ["sample_id", "key", "score", "prediction"]
    assert (
        shards.sort_values("sample_id")[cols]
        .reset_index(drop=True)
        .equals(whole.sort_values("sample_id")[cols].reset_index(drop=True))
    )


def test_merge_folds_shards_into_the_unsharded_run_and_resume_reuses_them(tmp_path, monkeypatch):
    from infllm_eval.commands.merge import merge_shards

    for i in range(3):
        runner.run_cell(_cfg(tmp_path, f"shard={i}/3", "task.depths=[0.0,0.5,1.0]"))
    res = merge_shards(tmp_path / "tiny-llama/full/passkey", remove_shards=True)
    assert res.added == 3 and res.complete and not res.notes and not list((tmp_path / "tiny-llama/full").glob("passkey-shard*"))
    calls = _count_generate(monkeypatch)
    summary = runner.run_cell(_cfg(tmp_path, "task.depths=[0.0,0.5,1.0]"))  # the unsharded run: all reused
    assert calls["n"] == 0 and summary["n_ok"].sum() == 3
    assert len(load_runs(tmp_path)) == 3
