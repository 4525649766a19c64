"""Where InfLLM's lookup would rank a passkey needle's memory units under other `repr_topk` values, per layer.

    .venv/bin/python -m probes.repr_ranks LENGTH DEPTH [INDEX] [OVERRIDES...]
    .venv/bin/python -m probes.repr_ranks 32768 0.7 1               # SmolLM2 + its InfLLM preset

Runs the passkey sample (length, depth, index) through InfLLM once with the configured `repr_topk`, saving every
unit's keys and accumulated local attention scores and each layer's global query of the last prompt token. Then,
offline, it rebuilds every unit's representative vectors for repr_topk 1, 2, 4, ... and prints the layers where a
needle unit would rank outside topk at that lookup. An approximation: the hidden states come from the configured
run, so the effect of other selections on later tokens is not included; a lead to test with `infllm-eval run`.
The keys, scores and query come from InfLLM's observation hook (`InfLLM.observer`); only InfLLM is accepted.
"""

from __future__ import annotations

import sys

import torch

from probes.common import passkey_sample


def main(argv: list[str]) -> None:
    cfg, lm, sample, eng, unit_of = passkey_sample(argv, "probes/repr_ranks.py")
    method = eng.method
    n = sample.meta["needle_n_tokens"]
    needle = sorted(set(unit_of))
    print(f"needle units {needle} holding {[unit_of.count(u) for u in needle]} of its {n} tokens; topk {method.topk}")

    units: dict[int, list] = {}  # layer -> [(keys [H_kv, bs, D], scores [H, bs])] in unit order
    query: dict[int, torch.Tensor] = {}  # layer -> global query [H, D] of the first one-token lookup

    def observe(event, layer, **data):
        if event == "unit":
            units.setdefault(layer, []).append((data["keys"][0].clone(), data["scores"][0].clone()))
        elif data["n_queries"] == 1 and layer not in query:
            query[layer] = data["query"][0].clone()

    method.observer = observe
    try:
        g = eng.generate(sample.input_ids, 2, int(cfg.chunk_size), list(lm.stop_token_ids))
    finally:
        method.observer = None
    print(f"prediction {lm.tokenizer.decode(g.tokens)!r} (key {sample.meta['key']}) with repr_topk "
          f"{method.repr_topk}")
    group = eng.spec.n_heads // eng.spec.n_kv_heads
    r = 1
    while r <= method.block_size:
        missed = []
        for layer in sorted(units):
            if layer not in query:  # no lookup scored the units: every unit was retrieved
                continue
            ks = torch.stack([k for k, _ in units[layer]]).repeat_interleave(group, dim=1)  # [U, H, bs, D]
            sc = torch.stack([s for _, s in units[layer]])  # [U, H, bs]
            idx = sc.topk(r, dim=-1).indices[..., None].expand(-1, -1, -1, ks.shape[-1])
            reps = torch.gather(ks, 2, idx).float().mean(dim=2)  # [U, H, D]
            order = torch.einsum("hd,uhd->u", query[layer], reps).argsort(descending=True)
            ranks = [int((order == u).nonzero()) for u in needle]
            if max(ranks) >= method.topk:
                missed.append(f"{layer}: {ranks}")
        print(f"repr_topk {r:3d}: layers with a needle unit ranked >= topk (ranks of {needle}): "
              f"{', '.join(missed) or 'none'}")
        r *= 2


if __name__ == "__main__":
    main(sys.argv[1:])
