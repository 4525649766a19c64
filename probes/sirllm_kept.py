"""Which of the passkey needle's tokens SirLLM still holds when the question is read, and how their entropies rank.

    .venv/bin/python -m probes.sirllm_kept LENGTH DEPTH [INDEX] [OVERRIDES...]
    .venv/bin/python -m probes.sirllm_kept 16384 0.5 0        # SmolLM2 + its SirLLM preset (chunks of 512)

Builds the passkey sample exactly as `infllm-eval run` does, runs it through SirLLM and follows every token's
absolute position through the evictions (the indices each call keeps, `_Sample.keep`, applied to a parallel list of
positions). Prints, after the context (before the last prompt token), the needle tokens kept / evicted, their
entropies and ranks among the cached tokens, and the entropy the cache's lowest kept token had. Wraps `attend` for
the run (no code changes).
"""

from __future__ import annotations

import sys

import torch

from infllm_eval.methods.sirllm import SirLLM
from probes.common import passkey_sample


def sirllm_kept(argv: list[str]):
    cfg, lm, sample, eng, _ = passkey_sample(argv, "probes/sirllm_kept.py", SirLLM, "sirllm")
    m: SirLLM = eng.method
    at, n = sample.meta["needle_token_index"], sample.meta["needle_n_tokens"]
    first = eng.spec.first_layer if hasattr(eng.spec, "first_layer") else 0
    cached: list[int] = []  # absolute position of each cache slot
    snap = {}
    attend, end_context = m.attend, m.end_context

    def following_attend(state, q, k, v, pos, out=None):
        o = attend(state, q, k, v, pos, out)
        if state["layer"] == first:
            keep = state["sample"].keep
            if keep is not None:
                cached[:] = [cached[i] for i in keep.tolist()]
            cached.extend(int(p) for p in pos)
        return o

    def observing_end_context(states):
        ent = states[first]["sample"].ent
        snap["positions"], snap["ent"] = list(cached), ent.clone()
        return end_context(states)

    m.attend, m.end_context = following_attend, observing_end_context
    try:
        g = eng.generate(sample.input_ids, 8, int(cfg.chunk_size), list(lm.stop_token_ids))
    finally:
        del m.attend, m.end_context
    ids = sample.input_ids.view(-1).tolist()
    ent, posns = snap["ent"], snap["positions"]
    order = torch.argsort(ent, descending=True, stable=True).tolist()
    rank = {posns[i]: r for r, i in enumerate(order)}
    rows = [(t, lm.tokenizer.decode([ids[t]]), t in rank, float(ent[posns.index(t)]) if t in rank else None,
             rank.get(t)) for t in range(at, at + n)]
    return {"at": at, "n": n, "key": sample.meta["key"], "cached": len(posns), "min_ent": float(ent.min()),
            "prediction": lm.tokenizer.decode(g.tokens)}, rows


def main(argv: list[str]) -> None:
    f, rows = sirllm_kept(argv)
    print(f"needle tokens [{f['at']}, {f['at'] + f['n']}); key {f['key']}; cached after the context: {f['cached']} "
          f"tokens, lowest kept entropy {f['min_ent']:.3f}")
    print(f"prediction {f['prediction']!r}")
    for t, text, kept, e, r in rows:
        print(f"  {t:6d} {text!r:12} " + (f"kept, entropy {e:.3f}, rank {r}" if kept else "evicted"))


if __name__ == "__main__":
    main(sys.argv[1:])
