"""Where InfLLM's lookup would rank a passkey needle's memory units under other `repr_topk` values, per layer.

    .venv/bin/python runners/repr_ranks.py LENGTH DEPTH [INDEX] [OVERRIDES...]
    .venv/bin/python runners/repr_ranks.py 32768 0.7 1              # SmolLM2 + its InfLLM preset

Runs the passkey sample (length, depth, index) through InfLLM once with the configured `repr_topk`, saving every
unit's keys and accumulated local attention scores and each layer's global query of the last prompt token. Then,
offline, it rebuilds every unit's representative vectors for repr_topk 1, 2, 4, ... and prints the layers where a
needle unit would rank outside topk at that lookup. An approximation: the hidden states come from the configured
run, so the effect of other selections on later tokens is not included; a lead to test with `infllm-eval run`.
"""

from __future__ import annotations

import sys

import torch

from needle_ranks import passkey_sample  # same folder

from infllm_eval.engine import Engine
from infllm_eval.methods import make_method
from infllm_eval.methods.infllm import InfLLM


def main(argv: list[str]) -> None:
    cfg, lm, sample, unit_of = passkey_sample(argv)
    p = cfg.method.params
    n = sample.meta["needle_n_tokens"]
    needle = sorted(set(unit_of))
    print(f"needle units {needle} holding {[unit_of.count(u) for u in needle]} of its {n} tokens; topk {p.topk}")

    layer_now = [0]
    units: dict[int, list] = {}  # layer -> [(keys [H_kv, bs, D], scores [H, bs])] in unit order
    query: dict[int, torch.Tensor] = {}  # layer -> global query [H, D] of the first one-token lookup
    orig = InfLLM.new_state, InfLLM.attend, InfLLM._representative, InfLLM._plan_topk

    def new_state(self, i):
        s = orig[0](self, i)
        s["layer"] = i
        return s

    def attend(self, state, q, k, v, pos, out=None):
        layer_now[0] = state["layer"]
        return orig[1](self, state, q, k, v, pos, out)

    def representative(self, k, score):
        units.setdefault(layer_now[0], []).append((k[0].clone(), score[0].clone()))
        return orig[2](self, k, score)

    def plan_topk(self, state, q, st, L):
        if L == 1 and state["layer"] not in query:
            query[state["layer"]] = self._global_q(q)[0, :, 0].float().clone()
        return orig[3](self, state, q, st, L)

    InfLLM.new_state, InfLLM.attend, InfLLM._representative, InfLLM._plan_topk = (new_state, attend,
                                                                                    representative, plan_topk)
    eng = Engine(lm.model, make_method(cfg.method), lm.device, lm.dtype)
    g = eng.generate(sample.input_ids, 2, int(cfg.chunk_size), list(lm.stop_token_ids))
    print(f"prediction {lm.tokenizer.decode(g.tokens)!r} (key {sample.meta['key']}) with repr_topk {p.repr_topk}")
    group = eng.spec.n_heads // eng.spec.n_kv_heads
    r = 1
    while r <= p.block_size:
        missed = []
        for layer in sorted(units):
            ks = torch.stack([k for k, _ in units[layer]]).repeat_interleave(group, dim=1)  # [U, H, bs, D]
            sc = torch.stack([s for _, s in units[layer]])  # [U, H, bs]
            idx = sc.topk(r, dim=-1).indices[..., None].expand(-1, -1, -1, ks.shape[-1])
            reps = torch.gather(ks, 2, idx).float().mean(dim=2)  # [U, H, D]
            order = torch.einsum("hd,uhd->u", query[layer], reps).argsort(descending=True)
            ranks = [int((order == u).nonzero()) for u in needle]
            if max(ranks) >= p.topk:
                missed.append(f"{layer}: {ranks}")
        print(f"repr_topk {r:3d}: layers with a needle unit ranked >= topk (ranks of {needle}): "
              f"{', '.join(missed) or 'none'}")
        r *= 2


if __name__ == "__main__":
    main(sys.argv[1:])
