"""Launchers: cells in parallel processes (joblib) and as SLURM array jobs (submitit) on a real cluster.

The SLURM test starts a single-node cluster on this machine (munged + slurmctld + slurmd) with
runners/slurm_local.sh, which as root installs Debian's slurm-wlm and munge when missing; the test is skipped
only where they cannot be installed.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infllm_eval.commands.report import load_runs

REPO = Path(__file__).resolve().parent.parent
SWEEP = [
    "model=tiny-llama,tiny-qwen2",
    "method=full,streamingllm",
    "task.lengths=[256]",
    "task.depths=[0.0,1.0]",
    "task.max_new_tokens=4",
    "progress=false",
]


def _run(args, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "infllm_eval.cli", "run", "-m", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def test_joblib_runs_cells_in_processes_and_reports_a_failed_cell(tmp_path):
    locked = tmp_path / "tiny-llama" / "full" / "passkey"
    locked.mkdir(parents=True)
    with open(locked / ".lock", "w") as f:  # another "process" holds this cell's run directory
        fcntl.flock(f, fcntl.LOCK_EX)
        r = _run(
            [
                "model=tiny-llama",
                "method=full,streamingllm",
                *SWEEP[2:],
                f"output_dir={tmp_path}",
                "hydra/launcher=local_parallel",
                "hydra.launcher.n_jobs=2",
            ]
        )
    # the failing cell ran in a joblib worker, yet the sweep names it and exits 1; the other cell finished
    assert r.returncode == 1, r.stderr[-2000:]
    assert "1 of 2 cells failed: tiny-llama/full/passkey" in r.stderr
    assert (tmp_path / "tiny-llama" / "streamingllm" / "passkey" / "summary.csv").exists()


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    state = Path(os.environ.get("SLURM_LOCAL_DIR", "/tmp/infllm-eval-slurm"))
    was_running = (state / "slurmctld.pid").exists()
    r = subprocess.run(
        ["bash", str(REPO / "runners" / "slurm_local.sh"), "start"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "SLURM_LOCAL_DIR": str(state)},
    )
    if r.returncode == 3:
        pytest.skip(f"no SLURM here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stdout + r.stderr
    yield {"SLURM_CONF": str(state / "slurm.conf")}
    if not was_running:
        subprocess.run(
            ["bash", str(REPO / "runners" / "slurm_local.sh"), "stop"],
            capture_output=True,
            timeout=60,
            env={**os.environ, "SLURM_LOCAL_DIR": str(state)},
        )


def test_slurm_sweep_runs_as_array_jobs_and_results_are_collected(slurm_cluster, tmp_path):
    r = _run(
        [
            *SWEEP,
            f"output_dir={tmp_path}",
            "hydra/launcher=slurm",
            "hydra.launcher.partition=debug",
            "hydra.launcher.gpus_per_node=null",
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=2",
            "hydra.launcher.timeout_min=10",
        ],
        env=slurm_cluster,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # one SLURM array task per cell (submitit folders <jobid>_<index>), each with its log
    tasks = sorted(p.name for p in (tmp_path / ".submitit").iterdir() if p.is_dir() and "_" in p.name)
    assert len(tasks) == 4 and len({t.split("_")[0] for t in tasks}) == 1, tasks
    logs = list((tmp_path / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 4 and all("results:" in p.read_text() for p in logs)
    df = load_runs(tmp_path)
    assert len(df) == 8 and (df["status"] == "ok").all()
    assert set(zip(df["model"], df["method"])) == {
        (m, x) for m in ("tiny-llama", "tiny-qwen2") for x in ("full", "streamingllm")
    }
