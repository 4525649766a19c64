"""A run's lifecycle: checked before anything is written, locked before the weights load, refused resumes touch
nothing, feasible lengths only, an exit code when nothing finished, progress in logs, Ctrl-C, hub lookups."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from infllm_eval import runner
from infllm_eval.config import compose
from infllm_eval.errors import UserError
from infllm_eval.store import RunStore

TINY = ["model=tiny-llama", "task.lengths=[200]", "task.depths=[0.0,1.0]", "task.samples=1", "progress=false"]
RUN_DIR = Path("tiny-llama/full/passkey")


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infllm_eval.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def _cfg(out: Path, *extra: str):
    return compose([*TINY, f"output_dir={out}", *extra])


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


# -- 1. a refused run writes nothing ------------------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["model=mistral", "model.path=/nonexistent"], "model.path"),
    (["device=cuda"], "cuda"),
    (["dtype=int8"], "int8"),
    (["task=infbench_kv_retrieval", "task.data_dir=/nonexistent"], "/nonexistent"),
    (["task.lengths=[10]"], "too short"),
    (["task.lengths=[2000000]"], "maximum of 1,048,576"),
])
def test_a_refused_run_leaves_no_directory(tmp_path, args, needle):
    if args == ["device=cuda"] and torch.cuda.is_available():
        pytest.skip("checks a machine without CUDA")
    out = tmp_path / "out"
    r = cli("run", "model=tiny-llama", "progress=false", *args, f"output_dir={out}")
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists(), list(out.rglob("*"))


def test_a_failure_while_the_weights_load_removes_only_what_this_call_created(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise UserError("weights are broken")

    monkeypatch.setattr(runner, "load_model", broken)
    (tmp_path / "keep").mkdir()
    with pytest.raises(UserError, match="broken"):
        runner.run_cell(_cfg(tmp_path / "keep"))
    assert list((tmp_path / "keep").iterdir()) == []  # output_dir existed: kept; the run's folders: removed
    # a directory that already holds records is never removed
    monkeypatch.undo()
    runner.run_cell(_cfg(tmp_path))
    before = _files(tmp_path / RUN_DIR)
    monkeypatch.setattr(runner, "load_model", broken)
    with pytest.raises(UserError):
        runner.run_cell(_cfg(tmp_path))
    assert _files(tmp_path / RUN_DIR) == before


# -- 2. a refused resume touches nothing ---------------------------------------------------------------------------
def test_a_resume_refused_for_a_corrupt_line_changes_no_file(tmp_path, monkeypatch):
    runner.run_cell(_cfg(tmp_path))
    run_dir = tmp_path / RUN_DIR
    lines = (run_dir / "samples.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "samples.jsonl").write_text('{"torn\n' + "".join(lines[1:]))  # line 1 of 2 corrupt
    before = _files(run_dir)
    loads = []
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: loads.append(1))
    with pytest.raises(UserError, match="line 1 is not valid JSON"):
        runner.run_cell(_cfg(tmp_path, "seed=3", "progress=true"))  # a config that would rewrite config.yaml
    assert _files(run_dir) == before and loads == []  # summary kept, config and provenance untouched, no weights


# -- 3. the lock comes before the weights ------------------------------------------------------------------------
def test_a_second_process_is_refused_before_the_weights_load(tmp_path, monkeypatch):
    loads = []
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: loads.append(1))
    with RunStore(tmp_path / RUN_DIR):  # another process writes this run directory
        with pytest.raises(UserError, match="in use by another"):
            runner.run_cell(_cfg(tmp_path))
    assert loads == []


# -- 4. lengths the run cannot serve -------------------------------------------------------------------------------
def test_lengths_over_the_memory_estimate_are_refused_unless_forced(tmp_path, monkeypatch):
    from infllm_eval.commands import plan

    monkeypatch.setattr(plan, "budget_bytes", lambda budget_gb, device: plan.GIB)  # a 1 GiB machine
    cfg = _cfg(tmp_path, "task.lengths=[1048576]", "task.depths=[0.5]")
    peak = plan.estimate(cfg, 1048576, "cpu")["peak"]
    assert peak > plan.GIB
    with pytest.raises(UserError, match=rf"1,048,576 tokens needs about {peak / plan.GIB:.1f} GiB.*1\.0 GiB budget"):
        runner.run_cell(cfg)
    assert not (tmp_path / "tiny-llama").exists()
    reached = []

    def stop(*a, **k):
        reached.append(1)
        raise UserError("stop before the 1M-token sample")

    monkeypatch.setattr(runner, "load_model", stop)
    with pytest.raises(UserError, match="stop before"):
        runner.run_cell(_cfg(tmp_path, "task.lengths=[1048576]", "task.depths=[0.5]", "allow_over_budget=true"))
    assert reached == [1]


# -- 5. nothing finished: exit 1 ---------------------------------------------------------------------------------
def test_a_run_where_no_sample_finished_exits_1(tmp_path):
    r = cli("run", *TINY, "sample_timeout_s=1e-9", f"output_dir={tmp_path}")
    assert r.returncode == 1, r.stderr
    assert "no sample finished (2 timeout)" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / RUN_DIR / "summary.csv").is_file()  # recorded as always


def test_a_sweep_cell_where_no_sample_finished_counts_as_unfinished(tmp_path):
    from infllm_eval.cli import _finished_since
    from infllm_eval.store import summarize

    cfg, t0 = _cfg(tmp_path), time.time()
    rec = dict(model="m", method="x", task="t", length=1, depth=0.0, status="timeout", score=None,
               n_input_tokens=None, prefill_s=None, decode_s=None, peak_mem_bytes=None)
    with RunStore(tmp_path / RUN_DIR) as store:
        store.write_summary([rec])
        assert not _finished_since(cfg, t0)  # another process / node ran it: its summary says n_ok = 0
        store.write_summary([rec, {**rec, "status": "ok", "score": 1.0, "n_input_tokens": 1, "prefill_s": 1.0,
                                   "decode_s": 0.1, "peak_mem_bytes": 1}])
        assert _finished_since(cfg, t0)


# -- 6. progress in logs -----------------------------------------------------------------------------------------
def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(tmp_path):
    r = cli("run", *TINY, "progress=true", f"output_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0].startswith("loading model tiny-llama") and "loaded on cpu" in lines[1]
    assert [x.split("]")[0] for x in lines[2:]] == ["[1/2", "[2/2"] and " ok score=" in lines[2]
    r = cli("run", *TINY, "progress=true", f"output_dir={tmp_path}")  # resumed: says so
    assert "resuming: 2 of 2 samples" in r.stderr and "[2/2] passkey passkey-L200-d1.00-0: reused" in r.stderr


def test_a_long_sample_reports_its_prefill_progress_with_an_eta(tmp_path, monkeypatch, capsys):
    """Inside a sample (an hour at 1M tokens): one line per prefill chunk at most every PREFILL_LINE_S seconds, with
    tokens done / total, rate and ETA; the last chunk always reports. Here both limits are lowered."""
    monkeypatch.setattr(runner._Feedback, "PREFILL_PROGRESS_TOKENS", 100)
    monkeypatch.setattr(runner._Feedback, "PREFILL_LINE_S", 0.0)
    runner.run_cell(_cfg(tmp_path, "progress=true", "chunk_size=64", "task.depths=[0.5]"))
    lines = [x for x in capsys.readouterr().err.splitlines() if "tokens prefilled" in x]
    n = json.loads((tmp_path / RUN_DIR / "samples.jsonl").read_text().splitlines()[0])["n_input_tokens"]
    assert len(lines) == -(-(n - 1) // 64), lines  # one per chunk of prompt[:-1]
    assert lines[0].strip().startswith("prefill passkey-L200-d0.50-0: 64 / ") and "ETA" in lines[0]
    assert f"{n - 1:,} / {n:,} tokens prefilled" in lines[-1]
    monkeypatch.setattr(runner._Feedback, "PREFILL_PROGRESS_TOKENS", 201)  # a sample shorter than it: no lines
    runner.run_cell(_cfg(tmp_path / "short", "progress=true", "chunk_size=64", "task.depths=[0.5]"))
    assert "tokens prefilled" not in capsys.readouterr().err


def test_records_say_where_the_units_were_stored(tmp_path):
    small = ["method=infllm", "method.params.n_local=64", "method.params.n_init=8", "method.params.block_size=16",
             "method.params.exc_block_size=32", "method.params.topk=2", "method.params.max_cached_block=4",
             "task.depths=[0.5]"]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    runner.run_cell(_cfg(tmp_path, *small, f"offload_dir={scratch}", "method.params.unit_dtype=bfloat16"))
    rec = json.loads((tmp_path / "tiny-llama/infllm/passkey/samples.jsonl").read_text().splitlines()[0])
    assert rec["status"] == "ok" and rec["memory"]["unit_storage"] == "files"
    assert rec["memory"]["unit_dtype"] == "bfloat16" and rec["memory"]["units"] > 0 and rec["peak_mem_bytes"] > 0
    assert "offload_dir: " + str(scratch) in (tmp_path / "tiny-llama/infllm/passkey/config.yaml").read_text()
    assert list(scratch.iterdir()) == []
    runner.run_cell(_cfg(tmp_path / "full", "task.depths=[0.5]"))
    assert "memory" not in json.loads((tmp_path / "full" / RUN_DIR / "samples.jsonl").read_text().splitlines()[0])


# -- 7. Ctrl-C --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C; scancel or a SLURM time limit
def test_ctrl_c_says_what_was_kept_and_how_to_resume(tmp_path, sig):
    args = [*TINY, "task.samples=40", f"output_dir={tmp_path}"]
    proc = subprocess.Popen([sys.executable, "-m", "infllm_eval.cli", "run", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    samples = tmp_path / RUN_DIR / "samples.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (samples.exists() and samples.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    kept = samples.read_text().count('"status": "ok"')
    assert f"interrupted: {kept} finished samples of this run are saved in {tmp_path / RUN_DIR}" in stderr, stderr
    assert "run the same command again to resume" in stderr and "Traceback" not in stderr


def test_an_interrupt_while_the_weights_load_leaves_nothing(tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "load_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.run_cell(_cfg(tmp_path))
    assert not (tmp_path / "tiny-llama").exists()
    assert "interrupted before any sample ran; nothing was written" in capsys.readouterr().err


# -- 8. hub lookups ----------------------------------------------------------------------------------------------
def test_an_uncached_hub_model_is_refused_at_once(tmp_path):
    # an empty cache and an endpoint that refuses connections (a machine with internet never downloads 14 GB here)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}
    t0 = time.time()
    r = cli("run", "model=mistral", f"output_dir={tmp_path / 'out'}", env=env)
    took = time.time() - t0
    assert r.returncode == 2 and "mistralai/Mistral-7B-Instruct-v0.2" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Retry" not in r.stderr, r.stderr
    assert took < 15, took  # the hub client's retries alone took 23 s
    assert not (tmp_path / "out").exists()


def test_a_cached_hub_model_never_asks_the_network(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from infllm_eval import models

    snap = tmp_path / "models--org--name" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (tmp_path / "models--org--name" / "refs").mkdir()
    (tmp_path / "models--org--name" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_reachable", lambda *a: pytest.fail("asked the network"))
    cfg = {"path": None, "id": "org/name", "revision": None}
    assert models._hub_location(cfg)[1]["local_files_only"] is True
    monkeypatch.setattr(models, "_hub_reachable", lambda *a: True)  # not cached, online: the hub may download it
    assert models._hub_location({**cfg, "id": "org/other"})[1]["local_files_only"] is False


# -- 9. the rest of its kind ------------------------------------------------------------------------------------
def test_a_full_disk_is_one_sentence_that_says_what_is_saved(tmp_path, monkeypatch):
    real, calls = RunStore.append, []

    def append(self, rec):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(self, rec)

    monkeypatch.setattr(RunStore, "append", append)
    with pytest.raises(UserError, match="No space left on device.*1 finished samples were saved"):
        runner.run_cell(_cfg(tmp_path))
    assert (tmp_path / RUN_DIR / "samples.jsonl").read_text().count("\n") == 1


def test_summary_csv_the_mark_of_a_finished_cell_is_written_last(tmp_path, monkeypatch):
    from infllm_eval import store

    written = []
    monkeypatch.setattr(store, "_atomic_write", lambda path, text: written.append(path.name))
    RunStore(tmp_path).write_summary([])
    assert written == ["summary.md", "summary.csv"]


def test_a_shard_without_samples_is_refused(tmp_path):
    with pytest.raises(UserError, match="shard=3/4 selects none of the task's 2 samples"):
        runner.run_cell(_cfg(tmp_path, "shard=3/4"))
    assert not tmp_path.joinpath("tiny-llama").exists()
