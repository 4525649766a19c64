"""`infllm-eval merge`: fold a run's shard directories (`shard=i/n`: run_name-shard{i}of{n}) into run_name.

All n shards must be present and belong to one config (same `cell_key`). Their records (those that count,
`store.current_records`) are appended to the unsharded run directory (under its lock, skipping keys it
already holds), with the first shard's config (shard removed) and provenance, and a fresh summary: exactly
what an unsharded run writes, so resuming it reuses every merged sample. With `remove_shards` the shard
directories are deleted afterwards; otherwise a report over a root holding both the merged run and its shards
sees every sample twice.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from infllm_eval.errors import UserError
from infllm_eval.store import SHARD_DIR, RunStore, current_records, read_run


def merge_shards(run_dir: str | Path, remove_shards: bool = False) -> tuple[Path, int]:
    """Merge `run_dir`-shard{i}of{n} into `run_dir`; returns (run_dir, records added)."""
    run_dir = Path(run_dir)
    shards = [read_run(p) for p in _shard_dirs(run_dir)]
    if len({s.provenance.get("cell_key") for s in shards}) != 1:
        raise UserError(
            f"The shards of '{run_dir}' were run with different configs; re-run them with one config."
        )
    records = [r for s in shards for r in s.records]
    cfg, prov = dict(shards[0].config), shards[0].provenance
    cfg["shard"] = None
    with RunStore(run_dir) as store:
        store.start(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), prov)
        have = {r.get("key") for r in store.load_records() if r.get("status") == "ok"}
        added = [r for r in records if r.get("key") not in have]
        for r in added:
            store.append(r)
        store.write_summary(current_records(store.load_records(), prov, cfg))
    if remove_shards:
        for shard in shards:
            shutil.rmtree(shard.dir)
    return run_dir, len(added)


def _shard_dirs(run_dir: Path) -> list[Path]:
    """The shard directories of `run_dir`, all n of one split (else a UserError naming what is wrong)."""
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
    return shards

