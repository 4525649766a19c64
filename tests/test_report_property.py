"""Property test (issue 24): report, check and merge over random mixes of duplicate, torn, corrupt, interrupted,
shrunk-grid and unreadable run directories. Seeded loop (hypothesis is not a dependency)."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from infllm_eval.commands.check import check
from infllm_eval.commands.merge import merge_shards
from infllm_eval.commands.report import notes, write_report
from infllm_eval.errors import UserError
from infllm_eval.store import scan_runs

LENGTHS, DEPTHS, SAMPLES = [100, 200], [0.0, 0.5], 2
KINDS = ["duplicate", "torn", "corrupt", "interrupted", "shrunk", "unreadable"]


def _record(method: str, length: int, depth: float, i: int, rng: random.Random) -> dict:
    sid = f"passkey-L{length}-d{depth:.2f}-{i}"
    status = rng.choice(["ok", "ok", "ok", "error"])
    return {"sample_id": sid, "key": f"{method}-{sid}", "cell_key": method, "model": "m", "method": method,
            "task": "passkey", "length": length, "depth": depth, "status": status,
            "score": float(rng.random() < 0.5) if status == "ok" else None, "n_input_tokens": length,
            "prefill_s": 1.0, "decode_s": 0.5, "peak_mem_bytes": 2**20, "prediction": "1", "answers": ["1"],
            "finished_at": f"2026-01-01T00:00:{rng.randrange(60):02d}"}


def _write_run(d: Path, method: str, records: list[dict], task: dict, shard: str | None = None) -> None:
    d.mkdir(parents=True)
    cfg = {"task": {"profile": "infllm", **task}, "dtype": "auto", "seed": 0, "shard": shard}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    prov = {"cell_key": method, "task_fingerprint": "T", "model_fingerprint": "M", "method": {"name": method},
            "device": "cpu"}
    (d / "provenance.json").write_text(json.dumps(prov))
    (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _finish(d: Path) -> None:
    """The summary, written last, as the runner does (a complete run)."""
    (d / "summary.csv").write_text("x\n")
    os.utime(d / "samples.jsonl", ns=(time.time_ns() - 10**9,) * 2)


def _scenario(root: Path, rng: random.Random) -> dict:
    """Writes a root of run directories with random problems; returns what a reader must find."""
    want = {"keys": set(), "unreadable": 0, "interrupted": 0, "bad_lines": 0, "outside": 0, "dup": 0}
    for k, method in enumerate(rng.sample(["full", "infllm", "streamingllm"], rng.randint(1, 3))):
        grid = [(L, d, i) for L in LENGTHS for d in DEPTHS for i in range(SAMPLES)]
        records = [_record(method, *g, rng) for g in rng.sample(grid, rng.randint(1, len(grid)))]
        kinds = set(rng.sample(KINDS, rng.randint(0, 3)))
        task = {"lengths": LENGTHS, "depths": DEPTHS, "samples": SAMPLES}
        if "shrunk" in kinds:
            task = {"lengths": [LENGTHS[0]], "depths": DEPTHS, "samples": 1}
        inside = [r for r in records if r["length"] in task["lengths"] and int(r["sample_id"][-1]) < task["samples"]]
        d = root / f"run{k}-{method}"
        _write_run(d, method, records, task)
        if "unreadable" in kinds:
            rng.choice([lambda: (d / "provenance.json").write_text("{torn"),
                        lambda: (d / "config.yaml").write_text("[a, b]\n"),
                        lambda: (d / "config.yaml").write_bytes(b"\xff\x00")])()
            want["unreadable"] += 1
            continue
        want["outside"] += len(records) - len(inside)
        with open(d / "samples.jsonl", "a") as f:
            if "corrupt" in kinds:
                f.write("{garbage\n" + json.dumps(records[0]) + "\n")  # a middle line; the record after it counts
                want["bad_lines"] += 1
            if "torn" in kinds:
                f.write(json.dumps(records[0])[:15])
                want["bad_lines"] += 1
        if "interrupted" in kinds or "torn" in kinds:  # a torn line means its writer died: no summary after it
            want["interrupted"] += 1
        else:
            _finish(d)
        want["keys"] |= {r["key"] for r in inside}
        if "duplicate" in kinds:  # the same samples again in a sibling directory (a kill / resume elsewhere)
            _write_run(root / f"copy{k}-{method}", method, inside, task)
            _finish(root / f"copy{k}-{method}")
            want["dup"] += len(inside)
    return want


def _shards(root: Path, rng: random.Random) -> tuple[int, int]:
    """Shards of one run with random problems; returns (records a merge must keep, shards that stopped early)."""
    n, records, dead = rng.randint(2, 4), 0, 0
    for i in range(n):
        d = root / f"s-shard{i}of{n}"
        kind = rng.choice(["ok", "ok", "dead", "interrupted", "corrupt"])
        if kind == "dead":
            d.mkdir()
            (d / "config.yaml").write_text("shard: x\n")
            dead += 1
            continue
        recs = [_record("full", 100, 0.0, k, rng) for k in range(i, 8, n)]
        _write_run(d, "full", recs, {"lengths": [100], "depths": [0.0], "samples": 8}, f"{i}/{n}")
        records += len(recs)
        if kind == "corrupt":
            with open(d / "samples.jsonl", "a") as f:
                f.write("not json\n")
        if kind != "interrupted":
            _finish(d)
    return records, dead


@pytest.mark.parametrize("seed", range(50))
def test_report_check_and_merge_agree_with_random_run_directories(tmp_path, seed):
    rng = random.Random(seed)
    root = tmp_path / "runs"
    want = _scenario(root, rng)
    scan = scan_runs(root)
    runs = scan.runs
    # nothing unreadable is silently dropped: every injected problem is flagged
    assert (runs["unreadable"] != "").sum() == want["unreadable"]
    assert (runs[runs["unreadable"] == ""]["run_status"] == "interrupted").sum() == want["interrupted"]
    assert runs["corrupt_lines"].sum() == want["bad_lines"]
    assert runs["outside_grid"].sum() == want["outside"]
    assert (scan.duplicates["n"].sum() if len(scan.duplicates) else 0) == want["dup"]
    if not want["keys"]:
        with pytest.raises(UserError):
            write_report(root, tmp_path / "rep", threshold=50)
        return
    paths = write_report(root, tmp_path / "rep", threshold=50)  # never raises when a sample counts
    tidy = pd.read_csv(paths["tidy_csv"])
    assert set(tidy["key"]) == want["keys"] and tidy["key"].is_unique  # one row per content key present
    md = paths["markdown"].read_text()
    assert all(n in md for n in notes(scan))
    # check against a baseline built from the same runs: a refusal (UserError) or a pass, never anything else
    try:
        res = check(str(root), str(paths["tidy_csv"]), tolerance=2.0, alpha=0.05, n_boot=200, seed=0,
                    allow_failures=False)
    except UserError:
        assert want["unreadable"] or want["bad_lines"] > 0
    else:
        assert not res.failed, res.markdown()
    # merge: a shard set with dead, interrupted and corrupt shards never raises and keeps every record
    shutil.rmtree(root)
    root.mkdir()
    n_records, dead = _shards(root, rng)
    if n_records == 0:
        with pytest.raises(UserError):
            merge_shards(root / "s")
        return
    res = merge_shards(root / "s", remove_shards=rng.random() < 0.5)
    kept = scan_runs(root)
    assert len(kept.table) == n_records  # nothing lost: merged, or still in a kept shard (folded as duplicates)
    assert res.complete == (not res.notes)
    assert sum("skipped shard" in n for n in res.notes) == dead
