"""Each finished sample's measured peak memory beside `plan`'s estimate for its run's config and length.

    .venv/bin/python -m probes.plan_vs_peak RUN_DIR [RUN_DIR ...]
    .venv/bin/python -m probes.plan_vs_peak results/smollm2-passkey-long/smollm2/*/passkey-*

For every ok sample of each run directory: length, depth, wall time, the peak the sample recorded
(`peak_mem_bytes`: on CPU the process's peak resident set during the sample), `plan`'s estimate of the peak
(`commands.plan.estimate` on the run's own config.yaml: weights, K/V in memory, workspace; units under an
offload_dir count on disk, not in the peak) and the ratio measured / estimate, plus the storage the sample used
(`memory`, for InfLLM). A markdown table on stdout.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

from infllm_eval.commands.plan import GIB, estimate
from infllm_eval.errors import UserError
from infllm_eval.store import read_samples


def rows(run_dir: Path) -> list[dict]:
    cfg = OmegaConf.load(run_dir / "config.yaml")
    device = "cuda" if str(cfg.device).startswith("cuda") else "cpu"
    out = []
    for r in read_samples(run_dir / "samples.jsonl").records:
        if r.get("status") != "ok" or not r.get("peak_mem_bytes"):
            continue
        try:
            e = estimate(cfg, int(r["length"]), device)
        except UserError:  # a config from an older harness version (other keys): no estimate
            e = {"peak": float("nan"), "kv_disk": float("nan")}
        mem = r.get("memory") or {}
        out.append({"run": str(run_dir), "method": cfg.method.name, "length": r["length"], "depth": r["depth"],
                    "score": r["score"], "wall_s": r.get("wall_s"), "peak_gib": r["peak_mem_bytes"] / GIB,
                    "plan_gib": e["peak"] / GIB, "plan_disk_gib": e["kv_disk"] / GIB,
                    "storage": f"{mem.get('unit_dtype', '')} {mem.get('unit_storage', '')}".strip() or "-"})
    return out


def main(argv: list[str]) -> None:
    table = [r for d in argv for r in rows(Path(d))]
    print("| method | length | depth | score | wall s | peak GiB | plan GiB | measured / plan | plan disk GiB | units |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['method']} | {r['length']:,} | {r['depth']} | {r['score']} | {r['wall_s']:.0f} | "
              f"{r['peak_gib']:.2f} | {r['plan_gib']:.2f} | {r['peak_gib'] / r['plan_gib']:.2f} | "
              f"{r['plan_disk_gib']:.2f} | {r['storage']} |")


if __name__ == "__main__":
    main(sys.argv[1:])
