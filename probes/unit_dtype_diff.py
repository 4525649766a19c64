"""What storing InfLLM's memory units in bfloat16 / float16 changes, against the compute dtype (fp32 on CPU).

    .venv/bin/python -m probes.unit_dtype_diff LENGTH DEPTH [INDEX] [OVERRIDES...]
    .venv/bin/python -m probes.unit_dtype_diff 32768 0.5          # SmolLM2 + its InfLLM preset

On the passkey sample `infllm-eval run` would build: the compute-dtype run generates greedily (the task's
max_new_tokens, its stop tokens); each narrow storage dtype then prefills the same prompt and is fed the same
tokens (teacher forcing), so every decoded position's logits compare one to one. Printed per dtype: max |logit difference| over
all positions, at the first position (after the prompt), whether every position's argmax agrees, and the
dtype's own free-running answer and score. `unit_dtype` changes only how units are stored (`method.params`).
"""

from __future__ import annotations

import sys

import torch

from infllm_eval.commands.plan import _max_new_tokens
from infllm_eval.engine import Engine
from infllm_eval.methods import make_method
from infllm_eval.metrics import get_metric
from probes.common import passkey_sample


@torch.no_grad()
def logits_along(eng: Engine, ids: torch.Tensor, chunk: int, n_new: int, stop: list[int],
                 tokens: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
    """Logits after the prompt and after each token fed back ([n, V]) and the tokens fed: greedy (argmax until a
    stop token or n_new tokens, as `Engine.generate`) when `tokens` is None, else exactly `tokens` (teacher
    forcing)."""
    states = eng.new_states()
    out, fed, n = [eng.prefill(states, ids, chunk)], [], ids.numel()
    while len(fed) < (n_new if tokens is None else len(tokens)):
        t = int(out[-1].argmax()) if tokens is None else tokens[len(fed)]
        if tokens is None and t in stop:
            break
        fed.append(t)
        if len(fed) < (n_new if tokens is None else len(tokens)):
            out.append(eng.forward(states, torch.tensor([[t]]), n + len(fed) - 1, logits=True))
    return torch.stack(out[: max(1, len(fed))]), fed


def main(argv: list[str]) -> None:
    cfg, lm, sample, eng, _ = passkey_sample(argv, "unit_dtype_diff")
    chunk, stop = int(cfg.chunk_size), list(lm.stop_token_ids)
    max_new = _max_new_tokens(cfg)  # the task's, as `run` takes it
    metric = get_metric("first_int_match")  # passkey's metric (tasks/passkey.yaml)
    base, tokens = logits_along(eng, sample.input_ids, chunk, max_new, stop)
    answer = lm.tokenizer.decode(tokens)
    print(f"{cfg.model.name} {cfg.method.name} L={sample.n_input_tokens} depth={argv[1]}: units in the compute "
          f"dtype ({lm.dtype}): {answer!r} score {metric(answer, sample.answers, **sample.score_fields)}", flush=True)
    for dt in ("bfloat16", "float16"):
        params = {**eng.method.params, "unit_dtype": dt}
        m = make_method({"impl": "infllm", "name": cfg.method.name, "params": params})
        e2 = Engine(lm.model, m, lm.device, lm.dtype)
        got, _ = logits_along(e2, sample.input_ids, chunk, max_new, stop, tokens)
        diff = (got - base).abs().amax(dim=-1)
        agree = bool((got.argmax(-1) == base.argmax(-1)).all())
        # the dtype's own greedy answer: the same tokens when every argmax agrees, else run free
        own = tokens if agree else logits_along(e2, sample.input_ids, chunk, max_new, stop)[1]
        text = lm.tokenizer.decode(own)
        print(f"  units in {dt}: max |dlogit| {diff.max():.4f} (first position {diff[0]:.4f}; logit std "
              f"{base[0].std():.2f}), argmax agrees at all {len(diff)} positions: {agree}; own answer "
              f"{text!r} score {metric(text, sample.answers, **sample.score_fields)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
