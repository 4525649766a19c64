"""Where one prefill's time goes, by wall-clock timers around the method's parts (no profiler).

    .venv/bin/python -m probes.time_parts LENGTH [OVERRIDES...]
    .venv/bin/python -m probes.time_parts 8192                     # SmolLM2 + its InfLLM preset

torch.profiler slows a CPU prefill by ~1.5x and charges part of that to small ops (on SmolLM2 InfLLM at 8K it
lists aten::cat at ~8 % of self CPU time; timed here, every torch.cat on the path takes ~1 %). This wraps a few
functions with `time.perf_counter` instead, after the same untimed warm-up as `bench`, prefills LENGTH seeded random
ids once and prints seconds, calls and share of the prefill for each part. The parts nest: `attention` (the
method's whole `attend`) holds `joint softmax` (kernels.multi_stage_attention), which holds `fused stages`
(retrieved units + initial tokens through the fused kernel; the rest of it is the explicit tiled path).
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from infllm_eval.commands.bench import warm_up
from infllm_eval.config import compose
from infllm_eval.engine import Engine
from infllm_eval.methods import make_method
from infllm_eval.models import load_model

ORDER = ["attention (attend)", "  joint softmax (multi_stage_attention)", "    fused stages", "  RoPE (Rope.apply)",
         "  unit lookup (_plan_topk)", "  unit gather", "  unit writes (UnitStore.add)"]


@contextmanager
def timers(method):
    """Wall-clock timers around the parts in ORDER (those the method's code has) while the block runs; yields
    {part: [calls, seconds]}. Every patched attribute is put back on exit, also after an error."""
    import infllm_eval.methods.kernels as kernels
    from infllm_eval.methods.memory import UnitStore
    from infllm_eval.rope import Rope

    stats: dict[str, list] = defaultdict(lambda: [0, 0.0])

    def timed(label, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                s = stats[label]
                s[0] += 1
                s[1] += time.perf_counter() - t
        return wrapper

    cls = type(method)
    module = sys.modules[cls.attend.__module__]  # the joint softmax as the module of the method's attend calls it
    patches = [(cls, "attend", ORDER[0], False), (module, "multi_stage_attention", ORDER[1], False),
               (kernels, "_fused_stage", ORDER[2], False), (Rope, "apply", ORDER[3], True),
               (cls, "_plan_topk", ORDER[4], False), (UnitStore, "gather", ORDER[5], False),
               (UnitStore, "add", ORDER[6], False)]
    saved = []  # (owner, name, its own attribute or None when inherited)
    try:
        for owner, name, label, static in patches:
            if not hasattr(owner, name):
                continue
            saved.append((owner, name, vars(owner).get(name)))
            fn = timed(label, getattr(owner, name))
            setattr(owner, name, staticmethod(fn) if static else fn)
        yield stats
    finally:
        for owner, name, orig in reversed(saved):
            if orig is None:
                delattr(owner, name)
            else:
                setattr(owner, name, orig)


def measure(cfg, length: int) -> tuple[float, dict[str, tuple[int, float]]]:
    """Prefill `length` seeded random ids with the method of the composed config `cfg`, timers in place; returns
    (seconds, {part: (calls, seconds)}). The timers are removed again before returning."""
    lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    method = make_method(cfg.method)
    eng = Engine(lm.model, method, lm.device, lm.dtype)
    with timers(method) as stats:
        vocab, cs = lm.model.config.vocab_size, int(cfg.chunk_size)
        warm_up(eng, cfg)
        stats.clear()
        ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(7))
        states = eng.new_states()
        t = time.perf_counter()
        for st in range(0, length, cs):
            eng.forward(states, ids[:, st : st + cs], st, logits=False)
        total = time.perf_counter() - t
    return total, {k: (int(n), sec) for k, (n, sec) in sorted(stats.items(), key=lambda kv: ORDER.index(kv[0]))}


def main(argv: list[str]) -> None:
    length, overrides = int(argv[0]), argv[1:]
    cfg = compose(["method=infllm", *overrides])
    total, stats = measure(cfg, length)
    print(f"{cfg.model.name} {cfg.method.name} {length} tokens, chunk {cfg.chunk_size}: {total:.1f} s, "
          f"{length / total:.1f} tok/s")
    for label, (n, sec) in stats.items():
        print(f"{label:42s} {sec:8.2f} s {n:7d} calls {100 * sec / total:6.1f} %")
    att = stats.get(ORDER[0], (0, 0.0))[1]
    print(f"{'outside attention (linear layers, norms, ...)':42s} {total - att:8.2f} s {'':13s} "
          f"{100 * (total - att) / total:6.1f} %")


if __name__ == "__main__":
    main(sys.argv[1:])
