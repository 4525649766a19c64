"""The command line as a user meets it: listings, resolved config, bad input (exit 2, one sentence), runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml

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
    # what produced the run is recorded: the overrides, the preset and the per-model file (none here)
    asked = {"overrides": [*TINY, f"output_dir={tmp_path}"], "preset": None, "per_model": None, "local": None}
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["invocation"] == asked
    assert prov["invocation"] == asked
    # same settings again (another command line): nothing recomputed, nothing appended
    r2 = cli("run", *TINY, f"output_dir={tmp_path}", "resume=true")
    assert r2.returncode == 0
    assert len((run_dir / "samples.jsonl").read_text().splitlines()) == 2
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["invocation"]["overrides"][-1] == "resume=true"
    # a semantic change (seed) never reuses stale results
    cli("run", *TINY, f"output_dir={tmp_path}", "seed=1")
    assert len((run_dir / "samples.jsonl").read_text().splitlines()) == 4


def test_multirun_runs_every_cell(tmp_path):
    r = cli("run", "-m", *TINY, "method=full,streamingllm", f"output_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    for m in ("full", "streamingllm"):
        assert (tmp_path / "tiny-llama" / m / "passkey" / "summary.csv").exists()
        recorded = yaml.safe_load((tmp_path / "tiny-llama" / m / "passkey" / "config.yaml").read_text())["invocation"]
        assert f"method={m}" in recorded["overrides"] and recorded["preset"] is None


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


def test_summary_table_headers_are_whole_at_80_columns():
    import io

    from rich.console import Console

    from infllm_eval import cli as cli_module
    from infllm_eval.store import summarize

    rec = {"model": "m", "method": "infllm", "task": "passkey", "length": 1048576, "depth": 0.75, "status": "ok",
           "score": 1.0, "n_input_tokens": 1048576, "prefill_s": 123.456, "decode_s": 12.345,
           "peak_mem_bytes": 81920 * 2**20}
    buf = io.StringIO()
    real, cli_module.out = cli_module.out, Console(file=buf, width=80)
    try:
        cli_module.show_summary(summarize([rec, rec]), "tiny-llama · streamingllm-original · passkey")
    finally:
        cli_module.out = real
    text = buf.getvalue()
    assert "…" not in text and max(len(x) for x in text.splitlines()) <= 80
    header = next(x for x in text.splitlines() if "length" in x)
    assert all(h in header for h in cli_module.SUMMARY_HEADERS.values())
    assert "1048576" in text and "81920.0" in text  # values whole too


# -- a new user's overrides: each one works or is refused in one sentence (exit 2), before anything is created --
NEW_USER = [
    # unknown options of any config group (Hydra skips a missing optional option silently)
    ("run", ["preset=mistral-infbnech"], "Did you mean 'mistral-infbench'"),
    ("run", ["per_model=typo"], "Unknown per_model 'typo'"),
    ("config", ["hydra/launcher=typo"], "Unknown hydra/launcher 'typo'"),
    ("run", ["-m", "hydra/launcher=slurmm", "seed=0,1"], "Did you mean 'slurm'"),
    ("run", ["hydra/launchr=slurm"], "Did you mean 'hydra/launcher'"),
    ("run", ["local=foo"], "Unknown local 'foo'"),
    ("run", ["presets=mistral-infbench"], "Did you mean 'preset'"),
    ("run", ["preset=null"], "~preset"),
    ("run", ["+preset=mistral-infbench"], "without '+'"),
    ("run", ["task=passkey,nosuch"], "Unknown task 'nosuch'"),
    ("run", ["-m", "model=tiny-llama", "method=infllm", "preset=mistral-infbench,mistral-infbnech"],
     "Did you mean 'mistral-infbench'"),
    ("plan", ["preset=mistral-infbnech"], "Did you mean 'mistral-infbench'"),
    ("config", ["per_model=mistral_infllmm"], "Did you mean 'mistral_infllm'"),
    # unknown keys: the valid ones and "Did you mean"; added keys nobody reads; removed keys the harness reads
    ("run", ["method=infllm", "method.params.topkk=3"], "Did you mean 'method.params.topk'"),
    ("run", ["method.params.foo=1"], "Keys of method.params:"),
    ("run", ["task.lenghts=[300]"], "Did you mean 'task.lengths'"),
    ("run", ["model.params.x=1"], "Unknown key 'model.params'"),
    ("run", ["+foo=1"], "Unknown key 'foo'"),
    ("run", ["++seed2=1"], "Did you mean 'seed'"),
    ("run", ["+task.foo=1"], "Unknown key 'task.foo'"),
    ("run", ["++model.foo=1"], "Unknown key 'model.foo'"),
    ("run", ["+seed=1"], "without '+'"),
    ("run", ["~task.samples"], "~task.samples"),
    ("run", ["invocation.preset=x"], "Unknown key 'invocation'"),
    ("run", ["model=smollm2", "model.tiny.seed=1"], "model.tiny"),
    ("run", ["task.data_dir=/data"], "Unknown key 'task.data_dir' for task 'passkey'"),
    ("run", ["task.definition=longbench_trec"], "task=<name>"),
    ("run", ["task=null"], "Unknown task 'null'"),
    ("run", ["seed"], "key=value"),
    ("run", ["task.lengths=[300,300]"], "without repeats"),
    ("run", ["-m", "hydra/launcher=local_parallel", "hydra.launcher.n_job=2", "seed=0,1"],
     "Did you mean 'hydra.launcher.n_jobs'"),
    # model keys the chosen model's source never reads
    ("run", ["model=tiny-llama", "model.path=/nonexistent"], "model.path"),
    ("run", ["model=tiny-llama", "model.revision=main"], "model.revision"),
    ("run", ["model=tiny-llama", "model.trust_remote_code=true"], "model.trust_remote_code"),
    ("run", ["model=smollm2", "model.path=/nonexistent"], "model.path"),
    ("run", ["model=mistral", "model.path=/nonexistent"], "not a model directory"),
    # values checked before anything is created
    ("run", ["dtype=int8"], "dtype"),
    ("run", ["device=gpu"], "device"),
    ("run", ["run_name=/abs/elsewhere"], "run_name"),
    ("run", ["run_name=../../elsewhere"], "run_name"),
    ("run", ["method=full,infllm"], "-m"),
    ("run", ["hydra/launcher=local_parallel"], "run -m"),
    ("run", ["hydra.launcher.n_jobs=2"], "run -m"),
    ("bench", ["bench.lengths=[-1]"], "bench.lengths"),
    ("bench", ["bench.methods=[ful]"], "Did you mean 'full'"),
    ("bench", ["bench.memory_fraction=1.5"], "bench.memory_fraction"),
    ("bench", ["bench.warmup_tokens=0"], "bench.warmup_tokens"),
    ("run", ["bench.decode_tokens=-1"], "bench.decode_tokens"),
]


@pytest.mark.parametrize("command,args,needle", NEW_USER, ids=[" ".join(a) for _, a, _ in NEW_USER])
def test_a_new_users_bad_override_is_one_sentence_and_creates_nothing(tmp_path, command, args, needle):
    out = tmp_path / "out"
    r = cli(command, *args, "model=tiny-llama" if not any(a.startswith("model=") for a in args) else "progress=false",
            f"output_dir={out}", f"bench.output_dir={out}")
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_is_refused_for_run_but_not_for_config(tmp_path):
    r = cli("run", *TINY, "device=cuda", f"output_dir={tmp_path / 'out'}")
    assert r.returncode == 2 and "not available" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
    assert cli("config", "device=cuda").returncode == 0  # a config (and a plan) may be for another machine


def test_config_prints_yaml_that_loads_back_to_the_composed_config():
    from infllm_eval.config import compose, to_dict

    args = ["model=tiny-llama", "method=infllm", "run_name=" + "a-long-run-name/" * 12 + "end"]
    r = cli("config", *args)
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout) == to_dict(compose(args))
