"""In-process A/B of full attention's prefill: the transformers peer, the engine now, and the engine without
`kernels._causal_flash` (per-tile SDPA with a band mask, the path before it), alternated in one process.

    .venv/bin/python -m probes.full_vs_peer LENGTH [CHUNK] [REPEATS] [OVERRIDES...]
    .venv/bin/python -m probes.full_vs_peer 16384 8192 2

Each prefills the same seeded random ids in CHUNK chunks (default 8192) after a 512-token warm-up; one line per
runner and repeat: seconds and tokens/s. In one process, alternated, so the machine's drift hits all three alike
(`bench` runs each cell in a fresh process instead, for memory).
"""

from __future__ import annotations

import sys
import time

import torch

from infllm_eval.commands.bench import Peer
from infllm_eval.config import compose
from infllm_eval.engine import Engine
from infllm_eval.methods import kernels, make_method
from infllm_eval.models import load_model


def main(argv: list[str]) -> None:
    nums = [a for a in argv if "=" not in a]
    length = int(nums[0])
    chunk = int(nums[1]) if len(nums) > 1 else 8192
    reps = int(nums[2]) if len(nums) > 2 else 1
    cfg = compose(["method=full", *[a for a in argv if "=" in a]])
    lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    peer = Peer(lm.model, make_method(cfg.method), lm.device, lm.dtype)
    eng = Engine(lm.model, make_method(cfg.method), lm.device, lm.dtype)
    ids = torch.randint(0, lm.model.config.vocab_size, (length,), generator=torch.Generator().manual_seed(1))
    for r in (peer, eng):
        r.prefill(r.new_states(), ids[:512], chunk)
    now = kernels._causal_flash
    try:
        for _ in range(reps):
            for name, r, flash in (("peer", peer, now), ("full", eng, now), ("full-tiled", eng, None)):
                kernels._causal_flash = flash or (lambda *a: None)
                t = time.perf_counter()
                r.prefill(r.new_states(), ids, chunk)
                dt = time.perf_counter() - t
                print(f"{name} L={length} chunk={chunk} threads={torch.get_num_threads()}: {dt:.1f} s, "
                      f"{length / dt:.0f} tok/s", flush=True)
    finally:
        kernels._causal_flash = now


if __name__ == "__main__":
    main(sys.argv[1:])
