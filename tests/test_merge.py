"""`infllm-eval merge`: shards folded into the unsharded run; dead, interrupted and corrupt shards (issue 24)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from infllm_eval.commands.merge import merge_shards
from infllm_eval.errors import UserError
from infllm_eval.store import load_runs, read_run
from test_report import _rec, make_run


def _shard(root: Path, i: int, n: int, complete: bool = True) -> Path:
    recs = [_rec("full", 100, 0.5, k, 1.0) for k in range(i, 6, n)]
    d = make_run(root, f"r-shard{i}of{n}", recs)
    if complete:
        (d / "summary.csv").write_text("x\n")
    return d


def _merge_cli(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infllm_eval.cli", "merge", str(run_dir), *extra],
                          capture_output=True, text=True, timeout=120)


def test_complete_shards_merge_into_a_run_with_a_summary(tmp_path):
    for i in range(3):
        _shard(tmp_path, i, 3)
    res = merge_shards(tmp_path / "r", remove_shards=True)
    assert (res.added, res.complete, res.notes) == (6, True, [])
    assert pd.read_csv(tmp_path / "r" / "summary.csv")["n"].sum() == 6 and not list(tmp_path.glob("r-shard*"))


def test_a_shard_that_died_before_its_first_sample_is_skipped_and_the_merge_says_so(tmp_path):
    _shard(tmp_path, 0, 3)
    _shard(tmp_path, 2, 3)
    (tmp_path / "r-shard1of3").mkdir()  # died while loading its model: an empty directory (or config.yaml only)
    (tmp_path / "r-shard1of3" / "config.yaml").write_text("shard: 1/3\n")
    r = _merge_cli(tmp_path / "r", "--remove-shards")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "skipped shard 'r-shard1of3'" in r.stderr and "(incomplete)" in r.stdout
    assert not (tmp_path / "r" / "summary.csv").exists()  # never a summary that looks complete
    run = read_run(tmp_path / "r")
    assert len(run.records) == 4 and run.status == "interrupted"
    assert (tmp_path / "r-shard1of3").exists()  # what was skipped is left alone
    assert set(load_runs(tmp_path)["run_status"]) == {"interrupted"}


def test_interrupted_or_corrupt_shards_merge_what_they_hold_and_are_kept(tmp_path):
    _shard(tmp_path, 0, 2)
    d = _shard(tmp_path, 1, 2, complete=False)
    with open(d / "samples.jsonl", "a") as f:
        f.write("garbage\n")
    res = merge_shards(tmp_path / "r", remove_shards=True)
    assert res.added == 6 and not res.complete
    assert any("r-shard1of2' is incomplete (1 unreadable lines" in n for n in res.notes)
    assert (tmp_path / "r-shard1of2").exists() and not (tmp_path / "r-shard0of2").exists()
    # the shards finished later: a second merge completes the run
    (d / "samples.jsonl").write_text("".join(x + "\n" for x in (d / "samples.jsonl").read_text().splitlines()[:-1]))
    (d / "summary.csv").write_text("x\n")
    make_run(tmp_path, "r-shard0of2", [_rec("full", 100, 0.5, k, 1.0) for k in range(0, 6, 2)])
    (tmp_path / "r-shard0of2" / "summary.csv").write_text("x\n")
    res = merge_shards(tmp_path / "r")
    assert res.complete and res.added == 0 and pd.read_csv(tmp_path / "r" / "summary.csv")["n"].sum() == 6


def test_bad_shards_are_one_sentence_and_exit_2(tmp_path):
    _shard(tmp_path, 0, 2)
    d = _shard(tmp_path, 1, 2)
    (d / "provenance.json").unlink()  # records that cannot be tied to a config
    r = _merge_cli(tmp_path / "r")
    assert r.returncode == 2 and "holds samples but no provenance.json" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
    (d / "provenance.json").write_text("{broken")
    r = _merge_cli(tmp_path / "r")
    assert r.returncode == 2 and "is not valid JSON" in r.stderr and "Traceback" not in r.stderr
    r = _merge_cli(d)
    assert r.returncode == 2 and "is a shard directory" in r.stderr
    for p in tmp_path.glob("r-shard*"):
        for f in p.iterdir():
            f.unlink()
    with pytest.raises(UserError, match="None of the 2 shards"):
        merge_shards(tmp_path / "r")


def test_records_outside_the_grid_are_merged_not_lost(tmp_path):
    for i in range(2):
        d = _shard(tmp_path, i, 2)
        cfg = {"task": {"profile": "infllm", "samples": 2}, "dtype": "auto", "seed": 0, "shard": f"{i}/2"}
        (d / "config.yaml").write_text(json.dumps(cfg))
        (d / "summary.csv").write_text("x\n")
    res = merge_shards(tmp_path / "r", remove_shards=True)
    assert res.complete and res.added == 6  # every record of the config, also those outside samples=2
    assert pd.read_csv(tmp_path / "r" / "summary.csv")["n"].sum() == 2
    assert len(read_run(tmp_path / "r").outside_grid) == 4
