"""Whether InfLLM-V2's stage 1 picks the passkey needle's blocks at the decoding-style lookups.

    .venv/bin/python -m probes.infllmv2_blocks LENGTH DEPTH [INDEX] [OVERRIDES...]
    .venv/bin/python -m probes.infllmv2_blocks 16384 0.5 0        # SmolLM2 + its InfLLM-V2 preset

Builds the passkey sample (length, depth, index) exactly as `infllm-eval run` does, runs it through InfLLM-V2 and
prints, for the last prompt token's selection (and the first generated token's), per layer: how many KV groups
chose a block holding needle tokens (init and local blocks are always chosen). A needle every group picks while the
answer is wrong is a model-side miss (for a true-position method past the model's window: positions it never saw),
not a selection miss. Reads `InfLLMv2._select` by wrapping it for the run (no code changes).
"""

from __future__ import annotations

import sys

from infllm_eval.methods.infllmv2 import InfLLMv2
from probes.common import generate_observing, passkey_sample


def infllmv2_blocks(argv: list[str]):
    cfg, lm, sample, eng, _ = passkey_sample(argv, "probes/infllmv2_blocks.py", InfLLMv2, "infllmv2")
    m: InfLLMv2 = eng.method
    at, n = sample.meta["needle_token_index"], sample.meta["needle_n_tokens"]
    needle = sorted({t // m.B for t in range(at, at + n)})
    log = []

    def observe(layer, sel, st, q, t, lag):  # sel [H_kv, tq, nB]
        if q.shape[1] == 1:  # a decoding-style lookup (one query)
            log.append((layer, int(sum(bool(sel[g, 0, needle].any()) for g in range(sel.shape[0]))), sel.shape[0]))

    g = generate_observing(cfg, lm, sample, eng, "_select", observe)
    return {"at": at, "n": n, "blocks": needle, "key": sample.meta["key"], "n_layers": eng.spec.n_layers,
            "prediction": lm.tokenizer.decode(g.tokens)}, log


def main(argv: list[str]) -> None:
    f, log = infllmv2_blocks(argv)
    L = f["n_layers"]
    print(f"needle tokens [{f['at']}, {f['at'] + f['n']}) -> blocks {f['blocks']}; key {f['key']}")
    print(f"prediction {f['prediction']!r}")
    for step, name in enumerate(["last prompt token", "first generated token"][: len(log) // L]):
        print(f"selection of the {name}: layer: KV groups that chose a needle block / groups")
        print("  " + ", ".join(f"{layer}: {k}/{G}" for layer, k, G in log[step * L : (step + 1) * L]))


if __name__ == "__main__":
    main(sys.argv[1:])
