"""Where InfLLM's lookup ranks the passkey needle's memory units, per layer, at the first decoding lookups.

    .venv/bin/python runners/needle_ranks.py LENGTH DEPTH [INDEX] [OVERRIDES...]
    .venv/bin/python runners/needle_ranks.py 32768 0.7 0              # SmolLM2 + its InfLLM preset

Builds the passkey sample (length, depth, index) exactly as `infllm-eval run` does, runs it through InfLLM and
prints, for the lookups of the last prompt token and the first generated token, each layer's rank of every unit
that holds needle tokens (0 = best; retrieved when rank < topk), by the summed-over-heads score InfLLM uses and
the best rank over single heads. A needle ranked < topk in (nearly) every layer while the answer is wrong is a
model-side miss, not a retrieval miss.
"""

from __future__ import annotations

import sys

from infllm_eval.config import compose
from infllm_eval.engine import Engine
from infllm_eval.methods import make_method
from infllm_eval.methods.infllm import InfLLM
from infllm_eval.models import load_model, render_chat
from infllm_eval.tasks import make_task


def passkey_sample(argv: list[str]):
    """LENGTH DEPTH [INDEX] [OVERRIDES...] -> (cfg, loaded model, sample, the sample's per-token needle units):
    the passkey sample exactly as `infllm-eval run` builds it, with SmolLM2's InfLLM preset unless overridden."""
    length, depth = int(argv[0]), float(argv[1])
    index = int(argv[2]) if len(argv) > 2 and "=" not in argv[2] else 0
    extra = [a for a in argv[2:] if "=" in a]
    cfg = compose(["method=infllm", "task=passkey", f"task.lengths=[{length}]", f"task.depths=[{depth}]",
                   f"task.samples={index + 1}", *extra])
    lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    render = (lambda t: render_chat(lm, t)) if cfg.model.chat_template else (lambda t: t)
    task = make_task(cfg.task, lm.tokenizer, render, answer_prefix=bool(cfg.model.answer_prefix), seed=cfg.seed)
    sample = task.build(next(s for s in task.sample_specs() if s["index"] == index))
    p = cfg.method.params
    at, n = sample.meta["needle_token_index"], sample.meta["needle_n_tokens"]
    unit_of = [(t - p.n_init) // p.block_size for t in range(at, at + n) if t >= p.n_init]
    return cfg, lm, sample, unit_of


def main(argv: list[str]) -> None:
    cfg, lm, sample, unit_of = passkey_sample(argv)
    p = cfg.method.params
    at, n = sample.meta["needle_token_index"], sample.meta["needle_n_tokens"]
    needle_units = sorted(set(unit_of))
    print(f"needle tokens [{at}, {at + n}) -> units {needle_units}; key {sample.meta['key']}; topk {p.topk}")

    log: list[tuple[int, dict, dict]] = []
    new_state, plan = InfLLM.new_state, InfLLM._plan_topk

    def traced_state(self, i):
        s = new_state(self, i)
        s["layer"] = i
        return s

    def traced_plan(self, state, q, st, L):
        if L == 1 and state["units"].n > self.topk:  # a decoding-style lookup (one query)
            q_glob = self._global_q(q)
            per_head = self.unit_scores(q_glob[:, None, :, 0].float(), state["units"])[0]  # [H, U]
            rank = lambda s, u: int((s.argsort(descending=True) == u).nonzero())  # noqa: E731
            log.append((state["layer"], {u: rank(per_head.sum(0), u) for u in needle_units},
                        {u: min(rank(per_head[h], u) for h in range(per_head.shape[0])) for u in needle_units}))
        return plan(self, state, q, st, L)

    InfLLM.new_state, InfLLM._plan_topk = traced_state, traced_plan
    eng = Engine(lm.model, make_method(cfg.method), lm.device, lm.dtype)
    g = eng.generate(sample.input_ids, 4, int(cfg.chunk_size), list(lm.stop_token_ids))
    print(f"prediction {lm.tokenizer.decode(g.tokens)!r}")
    L = eng.spec.n_layers
    for step, name in enumerate(["last prompt token", "first generated token"][: len(log) // L]):
        print(f"lookup of the {name}: layer: rank summed over heads (best single head)")
        for layer, r, h in log[step * L : (step + 1) * L]:
            cells = ", ".join(f"unit {u}: {r[u]} ({h[u]})" for u in needle_units)
            missed = [u for u in needle_units if r[u] >= p.topk]
            print(f"  {layer:3d}: {cells}{'   <- not retrieved: ' + str(missed) if missed else ''}")


if __name__ == "__main__":
    main(sys.argv[1:])
