"""The command line as a user meets it: listings, resolved config, bad input (exit 2, one sentence), runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

TINY = ["model=tiny-llama", "task.lengths=[200]", "task.depths=[0.0,1.0]", "task.samples=1", "progress=false"]


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infllm_eval.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_ls_lists_every_group_with_descriptions():
    r = cli("ls")
    assert r.returncode == 0
    for name in ("smollm2", "tiny-llama", "mistral", "llama3", "qwen2", "vicuna", "full", "infllm", "streamingllm",
                 "lminfinite", "passkey"):
        assert name in r.stdout
    r = cli("ls", "methods")
    assert r.returncode == 0 and "infllm" in r.stdout and "tiny-llama" not in r.stdout


def test_config_resolves_per_model_preset_and_user_override():
    r = cli("config", "model=llama3", "method=infllm")
    assert r.returncode == 0 and "base: 500000" in r.stdout and "topk: 16" in r.stdout
    r = cli("config", "model=llama3", "method=infllm", "preset=llama3-infbench", "method.params.topk=48")
    assert "topk: 48" in r.stdout and "max_cached_block: 64" in r.stdout
    r = cli("config", "model=smollm2", "method=infllm")
    assert "n_local: 2048" in r.stdout and "topk: 32" in r.stdout and "repr_topk: 1" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["method=fulll"], "Did you mean 'full'"),
    (["model=nosuch"], "Available:"),
    (["task.lengths=abc"], "task.lengths"),
    (["task.depths=[1.5]"], "task.depths"),
    (["seed=x"], "seed"),
    (["chunk_size=0"], "chunk_size"),
    (["nokey=1"], "nokey"),
    (["method=infllm", "method.params.max_cached_block=2"], "max_cached_block"),
    (["method=infllm", "method.params.n_local=100"], "exc_block_size"),
    (["method=streamingllm", "method.params.topk=3"], "topk"),
    (["method=full,infllm"], "-m"),
])
def test_bad_input_exits_2_with_one_sentence(args, needle):
    r = cli("run", *args)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_hub_model_without_cache_names_id_and_model_path(tmp_path):
    env_args = ["model=mistral", f"output_dir={tmp_path}"]
    r = subprocess.run([sys.executable, "-m", "infllm_eval.cli", "run", *env_args], capture_output=True, text=True,
                       timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert r.returncode == 2 and "mistralai/Mistral-7B-Instruct-v0.2" in r.stderr and "model.path" in r.stderr
    assert "Traceback" not in r.stderr


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = cli("run", *TINY, f"output_dir={blocker}/sub")
    assert r.returncode == 2 and "not writable" in r.stderr and "Traceback" not in r.stderr


def test_run_writes_all_files_and_resumes(tmp_path):
    r = cli("run", *TINY, f"output_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    run_dir = tmp_path / "tiny-llama" / "full" / "passkey"
    for name in ("config.yaml", "provenance.json", "samples.jsonl", "summary.csv", "summary.md"):
        assert (run_dir / name).exists(), name
    recs = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(r["status"] == "ok" and r["n_input_tokens"] == 200 for r in recs)
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert {"git", "versions", "device_name", "seed", "task_fingerprint"} <= set(prov)
    assert prov["attention_backend"] == "cpu-flash"
    summary = pd.read_csv(run_dir / "summary.csv")
    assert list(summary["depth"]) == [0.0, 1.0] and (summary["n"] == 1).all()
    assert "score" in r.stdout
    # same command again: nothing recomputed, nothing appended
    r2 = cli("run", *TINY, f"output_dir={tmp_path}")
    assert r2.returncode == 0
    assert len((run_dir / "samples.jsonl").read_text().splitlines()) == 2
    # a semantic change (seed) never reuses stale results
    cli("run", *TINY, f"output_dir={tmp_path}", "seed=1")
    assert len((run_dir / "samples.jsonl").read_text().splitlines()) == 4


def test_multirun_runs_every_cell(tmp_path):
    r = cli("run", "-m", *TINY, "method=full,streamingllm", f"output_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    for m in ("full", "streamingllm"):
        assert (tmp_path / "tiny-llama" / m / "passkey" / "summary.csv").exists()


def test_run_composes_once_and_computes_the_run_directory_once(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from infllm_eval import cli as cli_module
    from infllm_eval import runner
    from infllm_eval.store import summarize

    calls = {"compose": 0, "run_target": 0}
    real_compose, real_target = cli_module.compose, runner.run_target

    def compose(overrides):
        calls["compose"] += 1
        return real_compose(overrides)

    def run_target(cfg):
        calls["run_target"] += 1
        return real_target(cfg)

    seen = {}

    def run_cell(cfg, target=None):
        seen.update(cfg=cfg, target=target)
        return summarize([dict(model="m", method="x", task="t", length=1, depth=0.0, status="ok", score=1.0,
                               n_input_tokens=1, prefill_s=1.0, decode_s=0.1, peak_mem_bytes=1)])

    monkeypatch.setattr(cli_module, "compose", compose)
    monkeypatch.setattr(runner, "run_target", run_target)
    monkeypatch.setattr(runner, "run_cell", run_cell)
    r = CliRunner().invoke(cli_module.app, ["run", *TINY, "shard=1/2", f"output_dir={tmp_path}"])
    assert r.exit_code == 0, r.output
    assert calls == {"compose": 1, "run_target": 1}
    assert seen["target"].dir == tmp_path / "tiny-llama/full/passkey-shard1of2" and seen["target"].shard == (1, 2)
