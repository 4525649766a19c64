"""Where InfLLM's lookup ranks the passkey needle's memory units, per layer, at the first decoding lookups.

    .venv/bin/python -m probes.needle_ranks LENGTH DEPTH [INDEX] [OVERRIDES...]
    .venv/bin/python -m probes.needle_ranks 32768 0.7 0              # SmolLM2 + its InfLLM preset

Builds the passkey sample (length, depth, index) exactly as `infllm-eval run` does, runs it through InfLLM and
prints, for the lookups of the last prompt token and the first generated token, each layer's rank of every unit
that holds needle tokens (0 = best; retrieved when rank < topk), by the summed-over-heads score InfLLM uses and
the best rank over single heads. A needle ranked < topk in (nearly) every layer while the answer is wrong is a
model-side miss, not a retrieval miss. The ranks come from InfLLM's observation hook (`InfLLM.observer`); only
InfLLM is accepted.
"""

from __future__ import annotations

import sys

from probes.common import passkey_sample


def needle_ranks(argv: list[str]) -> tuple[dict, list[tuple[int, dict, dict]], object]:
    """LENGTH DEPTH [INDEX] [OVERRIDES...] -> (facts about the sample, [(layer, {unit: rank by summed score},
    {unit: best rank over single heads})] for every decoding-style lookup in order, the generation)."""
    cfg, lm, sample, eng, unit_of = passkey_sample(argv, "probes/needle_ranks.py")
    needle_units = sorted(set(unit_of))
    log: list[tuple[int, dict, dict]] = []

    def observe(event, layer, scores=None, n_queries=0, **_):
        if event == "lookup" and n_queries == 1:  # a decoding-style lookup (one query) that scored the units
            per_head = scores[0]  # [H, U]
            rank = lambda s, u: int((s.argsort(descending=True) == u).nonzero())  # noqa: E731
            log.append((layer, {u: rank(per_head.sum(0), u) for u in needle_units},
                        {u: min(rank(per_head[h], u) for h in range(per_head.shape[0])) for u in needle_units}))

    eng.method.observer = observe
    try:
        g = eng.generate(sample.input_ids, 4, int(cfg.chunk_size), list(lm.stop_token_ids))
    finally:
        eng.method.observer = None
    facts = {"at": sample.meta["needle_token_index"], "n": sample.meta["needle_n_tokens"], "units": needle_units,
             "key": sample.meta["key"], "topk": eng.method.topk, "n_layers": eng.spec.n_layers,
             "prediction": lm.tokenizer.decode(g.tokens)}
    return facts, log, g


def main(argv: list[str]) -> None:
    f, log, _ = needle_ranks(argv)
    needle_units, topk, L = f["units"], f["topk"], f["n_layers"]
    print(f"needle tokens [{f['at']}, {f['at'] + f['n']}) -> units {needle_units}; key {f['key']}; topk {topk}")
    print(f"prediction {f['prediction']!r}")
    for step, name in enumerate(["last prompt token", "first generated token"][: len(log) // L]):
        print(f"lookup of the {name}: layer: rank summed over heads (best single head)")
        for layer, r, h in log[step * L : (step + 1) * L]:
            cells = ", ".join(f"unit {u}: {r[u]} ({h[u]})" for u in needle_units)
            missed = [u for u in needle_units if r[u] >= topk]
            print(f"  {layer:3d}: {cells}{'   <- not retrieved: ' + str(missed) if missed else ''}")


if __name__ == "__main__":
    main(sys.argv[1:])
