"""Whether LongHeads' heads pick the passkey needle's chunks at the decoding-style lookups.

    .venv/bin/python -m probes.longheads_chunks LENGTH DEPTH [INDEX] [OVERRIDES...]
    .venv/bin/python -m probes.longheads_chunks 16384 0.5 0        # SmolLM2 + its LongHeads preset

Builds the passkey sample (length, depth, index) exactly as `infllm-eval run` does, runs it through LongHeads and
prints, for the last prompt token's selection (and the first generated token's), per layer: how many of the query
heads chose a chunk holding needle tokens, and the best rank of the needle's chunks by q·R among the scored
(unforced) candidates over the heads (0 = best; chosen when rank < atten_length / window_size - 3). A needle that
most heads pick while the answer is wrong is a model-side miss, not a selection miss. Reads `LongHeads._select` by
wrapping it for the run (no code changes).
"""

from __future__ import annotations

import sys

import torch

from infllm_eval.methods.longheads import LongHeads
from probes.common import generate_observing, passkey_sample


def longheads_chunks(argv: list[str]):
    cfg, lm, sample, eng, _ = passkey_sample(argv, "probes/longheads_chunks.py", LongHeads, "longheads")
    m: LongHeads = eng.method
    at, n = sample.meta["needle_token_index"], sample.meta["needle_n_tokens"]
    needle = sorted({t // m.w for t in range(at, at + n)})
    log = []

    def observe(layer, ids, st, q, g):
        if q.shape[1] == 1:  # a decoding-style lookup (one query)
            gl = int(g[-1])
            sc = torch.einsum("hd,hcd->hc", q[:, 0].float(), st["reps"][:, :gl])  # [H, g]
            cand = torch.arange(1, gl - 1)
            order = cand[torch.sort(sc[:, 1 : gl - 1], dim=-1, descending=True, stable=True).indices]  # [H, g-2]
            ranks = [min(int((order[h] == c).nonzero()[0]) for c in needle if 0 < c < gl - 1)
                     for h in range(q.shape[0])] if any(0 < c < gl - 1 for c in needle) else []
            heads = int(sum(bool(set(needle) & set(ids[h, 0].tolist())) for h in range(q.shape[0])))
            log.append((layer, heads, min(ranks) if ranks else None, q.shape[0]))

    g = generate_observing(cfg, lm, sample, eng, "_select", observe)
    return {"at": at, "n": n, "chunks": needle, "key": sample.meta["key"], "top": m.n_chunks - 3,
            "n_layers": eng.spec.n_layers, "prediction": lm.tokenizer.decode(g.tokens)}, log


def main(argv: list[str]) -> None:
    f, log = longheads_chunks(argv)
    L = f["n_layers"]
    print(f"needle tokens [{f['at']}, {f['at'] + f['n']}) -> chunks {f['chunks']}; key {f['key']}; "
          f"scored chunks chosen per head: {f['top']}")
    print(f"prediction {f['prediction']!r}")
    for step, name in enumerate(["last prompt token", "first generated token"][: len(log) // L]):
        print(f"selection of the {name}: layer: heads that chose a needle chunk / heads (best rank over heads)")
        for layer, heads, rank, H in log[step * L : (step + 1) * L]:
            print(f"  {layer:3d}: {heads}/{H} ({rank})")


if __name__ == "__main__":
    main(sys.argv[1:])
