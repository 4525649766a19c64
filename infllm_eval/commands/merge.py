"""`infllm-eval merge`: fold a run's shard directories (`shard=i/n`: run_name-shard{i}of{n}) into run_name.

All n shard directories must be present and the shards that hold samples must belong to one config (same
`cell_key`). Their records of that config (grid included: `store.config_records`) are appended to the
unsharded run directory (under its lock, skipping keys it already holds finished), with the first shard's
config (shard removed) and provenance. The merged summary.csv is written only when every shard is complete
(its own summary.csv, no unreadable line): exactly what an unsharded run writes, so resuming it reuses every
merged sample. Otherwise the merged run is left without a summary (`report` flags it as interrupted) and the
result says which shards are incomplete: resuming the unsharded run (or re-running those shards and merging
again) runs their missing samples. A shard directory that holds no sample and no provenance.json (a shard
that stopped before its first sample, e.g. while loading its model) is skipped with a note; one that holds
records but no provenance is refused (they cannot be tied to a config). With `remove_shards` only the shards
whose every record was merged are deleted; the others are kept and named. `report` folds the same sample
found in a merged run and its shards into one row.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from infllm_eval.errors import UserError
from infllm_eval.store import (COMPLETE, PROVENANCE_FILE, SAMPLES_FILE, SHARD_DIR, RunContents, RunStore,
                               current_records, read_run, read_samples)


@dataclass
class MergeResult:
    dir: Path  # the unsharded run directory
    added: int  # records appended to it
    complete: bool  # every shard complete: the merged summary.csv was written
    notes: list[str]  # what was skipped, incomplete or kept, one sentence each


def merge_shards(run_dir: str | Path, remove_shards: bool = False) -> MergeResult:
    """Merge `run_dir`-shard{i}of{n} into `run_dir` (see the module docstring)."""
    run_dir = Path(run_dir)
    dirs = _shard_dirs(run_dir)
    notes: list[str] = []
    shards = [s for s in (_read_shard(p, notes) for p in dirs) if s is not None]
    if not shards:
        raise UserError(f"None of the {len(dirs)} shards of '{run_dir}' holds a sample yet; run them first.")
    if len({s.provenance.get("cell_key") for s in shards}) != 1:
        names = ", ".join(f"{s.dir.name} ({s.provenance.get('cell_key')})" for s in shards)
        raise UserError(f"The shards of '{run_dir}' were run with different configs ({names}); re-run them "
                        "with one config.")
    incomplete = [s for s in shards if s.status != COMPLETE or s.bad_lines]
    done = [s for s in shards if all(s is not x for x in incomplete) and not s.other_configs]
    notes += [_incomplete(s) for s in incomplete]
    cfg, prov = dict(shards[0].config), shards[0].provenance
    cfg["shard"] = None
    complete = not notes
    with RunStore(run_dir) as store:
        store.start(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), prov)
        have = {r.get("key") for r in store.load_records() if r.get("status") == "ok"}
        added = [r for s in shards for r in s.records + s.outside_grid if r.get("key") not in have]
        for r in added:
            store.append(r)
        if complete:
            store.write_summary(current_records(store.load_records(), prov, cfg))
        else:
            notes.append(f"'{run_dir}' has no summary.csv until its missing samples run: resume it with the "
                         "unsharded config (or re-run the incomplete shards and merge again).")
    if remove_shards:
        notes += _remove(done, shards)
    return MergeResult(run_dir, len(added), complete, notes)


def _read_shard(path: Path, notes: list[str]) -> RunContents | None:
    """The shard's contents; None (with a note) for a shard that stopped before its first sample."""
    if not (path / PROVENANCE_FILE).is_file():
        held = read_samples(path / SAMPLES_FILE)
        if held.records or held.bad_lines:
            raise UserError(f"Shard '{path}' holds samples but no {PROVENANCE_FILE}, so they cannot be tied to a "
                            "config; restore it or re-run that shard.")
        notes.append(f"skipped shard '{path.name}': it holds no sample (it stopped before its first one, e.g. "
                     "while loading its model); its samples are missing from the merged run.")
        return None
    return read_run(path)


def _incomplete(s: RunContents) -> str:
    why = f"{len(s.bad_lines)} unreadable lines in its {SAMPLES_FILE}" if s.bad_lines else "it was interrupted"
    return f"shard '{s.dir.name}' is incomplete ({why}); its readable samples were merged."


def _remove(done: list[RunContents], shards: list[RunContents]) -> list[str]:
    for s in done:
        shutil.rmtree(s.dir)
    kept = [s.dir.name for s in shards if all(s is not x for x in done)]
    return [f"kept shard directories {', '.join(kept)}: they hold records not merged (unreadable lines, another "
            "config, or an interrupted run)."] if kept else []


def _shard_dirs(run_dir: Path) -> list[Path]:
    """The shard directories of `run_dir`, all n of one split (else a UserError naming what is wrong)."""
    if SHARD_DIR.match(run_dir.name):
        raise UserError(f"'{run_dir}' is a shard directory; pass the unsharded run directory (without -shard...).")
    shards = sorted(p for p in run_dir.parent.glob(f"{run_dir.name}-shard*of*")
                    if SHARD_DIR.match(p.name) and SHARD_DIR.match(p.name)["base"] == run_dir.name and p.is_dir())
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
