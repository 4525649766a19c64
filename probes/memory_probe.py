"""Per prefill chunk: throughput, host memory beyond the stored K/V, and glibc's heap, for one method.

    .venv/bin/python -m probes.memory_probe LENGTH [PROFILE_CHUNK] [OVERRIDES...]
    .venv/bin/python -m probes.memory_probe 65536                   # SmolLM2 + its InfLLM preset
    .venv/bin/python -m probes.memory_probe 32768 3                 # ... and a torch.profiler table of chunk 3
    .venv/bin/python -m probes.memory_probe 262144 offload_dir=/scratch method.params.unit_dtype=bfloat16

After the same untimed warm-up as `bench`, prefills LENGTH seeded random ids in `chunk_size` chunks and prints
after each chunk: tokens/s, RSS growth (and its peak during the chunk), stored K/V (`method.kv_bytes`; units in
files under `offload_dir` apart: they are not resident), their difference (the workspace `bench` reports as a
peak), and glibc's `mallinfo2` (heap arena, in use, free, mmapped). Where `bench` gives one peak per
length, this shows when the memory grows. Chunk PROFILE_CHUNK (if given) runs under torch.profiler and its
operators are printed by self CPU time (the profiler slows that chunk and adds memory).
"""

from __future__ import annotations

import ctypes
import sys
import time

import psutil
import torch

from infllm_eval.commands.bench import RssPeak, warm_up
from infllm_eval.config import compose, offload_dir
from infllm_eval.engine import Engine
from infllm_eval.methods import make_method
from infllm_eval.methods.memory import glibc
from infllm_eval.models import load_model


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def main(argv: list[str]) -> None:
    length = int(argv[0])
    overrides = argv[1:]
    prof_chunk = int(overrides.pop(0)) if overrides and overrides[0].isdigit() else -1
    cfg = compose(["method=infllm", *overrides])
    lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    eng = Engine(lm.model, make_method(cfg.method), lm.device, lm.dtype, offload_dir=offload_dir(cfg))
    vocab, cs = lm.model.config.vocab_size, int(cfg.chunk_size)
    warm_up(eng, cfg)
    libc = glibc()
    libc.mallinfo2.restype = _MallInfo2
    mb, proc = 2**20, psutil.Process()
    rss0 = proc.memory_info().rss
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(7))
    states, prof = eng.new_states(), None
    print(f"{cfg.model.name} {cfg.method.name} {length} tokens, chunk {cs}; MB after each chunk")
    for i, st in enumerate(range(0, length, cs)):
        t = time.perf_counter()
        with RssPeak() as peak:
            if i == prof_chunk:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    eng.forward(states, ids[:, st : st + cs], st, logits=False)
            else:
                eng.forward(states, ids[:, st : st + cs], st, logits=False)
        dt = time.perf_counter() - t
        kv = eng.method.kv_bytes(states)
        # units in files under offload_dir are not resident: the memory they take is the page cache's
        files = kv["offloaded"] / mb if eng.spec.offload_dir is not None else 0.0
        stored = (kv["device"] + kv["offloaded"]) / mb - files
        rss = (proc.memory_info().rss - rss0) / mb
        m = libc.mallinfo2()
        print(f"chunk {i} end {min(st + cs, length)}: {min(cs, length - st) / dt:.1f} tok/s | rss +{rss:.0f} "
              f"(peak in chunk +{(peak.peak - rss0) / mb:.0f}) "
              f"stored {stored:.0f} in files {files:.0f} workspace {rss - stored:.0f} | heap arena {m.arena / mb:.0f} "
              f"in use {m.uordblks / mb:.0f} free {m.fordblks / mb:.0f} mmapped {m.hblkhd / mb:.0f}", flush=True)
    if prof is not None:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main(sys.argv[1:])
