"""`infllm-eval merge`: fold a run's shard directories (`shard=i/n`: run_name-shard{i}of{n}) into run_name.

All n shards must be present and belong to one config (same `cell_key`). Their records are appended to the
unsharded run directory (under its lock, skipping keys it already holds), with the first shard's config (shard
removed) and provenance, and a fresh summary: exactly what an unsharded run writes, so resuming it reuses
every merged sample. With `remove_shards` the shard directories are deleted afterwards; otherwise a report
over a root holding both the merged run and its shards sees every sample twice.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml

from infllm_eval.errors import UserError
from infllm_eval.report import _current_records, read_records
from infllm_eval.store import RunStore

SHARD_DIR = re.compile(r"^(?P<base>.+)-shard(?P<i>\d+)of(?P<n>\d+)$")


def merge_shards(run_dir: str | Path, remove_shards: bool = False) -> tuple[Path, int]:
    """Merge `run_dir`-shard{i}of{n} into `run_dir`; returns (run_dir, records added)."""
    run_dir = Path(run_dir)
    shards = sorted(p for p in run_dir.parent.glob(f"{run_dir.name}-shard*of*") if SHARD_DIR.match(p.name))
    if not shards:
        raise UserError(f"No shard directories '{run_dir.name}-shard<i>of<n>' next to '{run_dir}'.")
    n = {int(SHARD_DIR.match(p.name)["n"]) for p in shards}
    if len(n) != 1:
        raise UserError(
            f"Shards of '{run_dir}' were cut in different ways ({sorted(n)}); merge one split only."
        )
    total = n.pop()
    found = sorted(int(SHARD_DIR.match(p.name)["i"]) for p in shards)
    if found != list(range(total)):
        missing = sorted(set(range(total)) - set(found))
        raise UserError(
            f"Shard(s) {missing} of {total} of '{run_dir}' are missing; run them (shard=i/{total}) first."
        )
    provs = [json.loads((p / "provenance.json").read_text()) for p in shards]
    if len({pv.get("cell_key") for pv in provs}) != 1:
        raise UserError(
            f"The shards of '{run_dir}' were run with different configs; re-run them with one config."
        )
    records = []
    for shard, prov in zip(shards, provs):
        cfg = yaml.safe_load((shard / "config.yaml").read_text()) or {}
        records += _current_records(read_records(shard / "samples.jsonl"), prov, cfg)
    cfg = yaml.safe_load((shards[0] / "config.yaml").read_text()) or {}
    cfg["shard"] = None
    with RunStore(run_dir) as store:
        store.start(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), provs[0])
        have = {r.get("key") for r in store.load_records() if r.get("status") == "ok"}
        added = [r for r in records if r.get("key") not in have]
        for r in added:
            store.append(r)
        mine = _current_records(store.load_records(), provs[0], cfg)
        store.write_summary(mine)
    if remove_shards:
        for shard in shards:
            shutil.rmtree(shard)
    return run_dir, len(added)
