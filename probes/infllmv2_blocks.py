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
from probes.common import passkey_sample


def infllmv2_blocks(argv: list[str]):
    cfg, lm, sample, eng, _ = passkey_sample(argv, "probes/infllmv2_blocks.py", InfLLMv2, "infllmv2")
    m: InfLLMv2 = eng.method
    at, n = sample.meta["needle_token_index"], sample.meta["needle_n_tokens"]
    needle = sorted({t // m.B for t in range(at, at + n)})
    n_layers, calls, log = eng.spec.n_layers, [0], []
    select, attend = m._select, m.attend

    def counting_attend(state, q, *a, **k):
        calls[0] += 1
        return attend(state, q, *a, **k)

    def observing_select(st, q, t, lag):
        sel = select(st, q, t, lag)  # [H_kv, tq, nB]
        if q.shape[1] == 1:
            groups = int(sum(bool(sel[g, 0, needle].any()) for g in range(sel.shape[0])))
            log.append(((calls[0] - 1) % n_layers, groups, sel.shape[0]))
        return sel

    m._select, m.attend = observing_select, counting_attend
    try:
        g = eng.generate(sample.input_ids, 4, int(cfg.chunk_size), list(lm.stop_token_ids))
    finally:
        m._select, m.attend = select, attend
    return {"at": at, "n": n, "blocks": needle, "key": sample.meta["key"], "n_layers": n_layers,
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
