"""Pieces the probes share: the passkey sample as `infllm-eval run` builds it, on a bound engine."""

from __future__ import annotations

from infllm_eval.config import compose
from infllm_eval.engine import Engine
from infllm_eval.errors import UserError
from infllm_eval.methods import make_method
from infllm_eval.methods.infllm import InfLLM
from infllm_eval.models import load_model, render_chat
from infllm_eval.tasks import make_task


def passkey_sample(argv: list[str], probe: str, method_cls=InfLLM, method_name: str = "infllm"):
    """LENGTH DEPTH [INDEX] [OVERRIDES...] -> (cfg, loaded model, sample, engine, the sample's per-token needle
    units, or None for a method other than InfLLM): the passkey sample exactly as `infllm-eval run` builds it,
    with SmolLM2's preset of `method_name` unless overridden, and an engine whose method (a `method_cls`;
    `probe` names the caller for the refusal) is bound."""
    length, depth = int(argv[0]), float(argv[1])
    index = int(argv[2]) if len(argv) > 2 and "=" not in argv[2] else 0
    extra = [a for a in argv[2:] if "=" in a]
    cfg = compose([f"method={method_name}", "task=passkey", f"task.lengths=[{length}]", f"task.depths=[{depth}]",
                   f"task.samples={index + 1}", *extra])
    method = make_method(cfg.method)
    if not isinstance(method, method_cls):
        raise UserError(f"{probe} measures the lookup of {method_name}, so it takes method={method_name} (or one of "
                        f"its presets), not method={cfg.method.name}.")
    lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    render = (lambda t: render_chat(lm, t)) if cfg.model.chat_template else (lambda t: t)
    task = make_task(cfg.task, lm.tokenizer, render, answer_prefix=bool(cfg.model.answer_prefix), seed=cfg.seed)
    sample = task.build(next(s for s in task.sample_specs() if s["index"] == index))
    eng = Engine(lm.model, method, lm.device, lm.dtype)  # binds the method: its n_init, block_size, topk, ...
    at, n = sample.meta["needle_token_index"], sample.meta["needle_n_tokens"]
    if not isinstance(method, InfLLM):
        return cfg, lm, sample, eng, None
    unit_of = [(t - method.n_init) // method.block_size for t in range(at, at + n) if t >= method.n_init]
    return cfg, lm, sample, eng, unit_of


def generate_observing(cfg, lm, sample, eng, name: str, observe, new_tokens: int = 4):
    """Generates `new_tokens` for the sample while `eng.method.<name>` is wrapped: after each call,
    `observe(layer, result, *args)` (layer = the attention layer of the forward pass in progress, counted through
    the method's `attend`). Both are put back afterwards, also after an error."""
    m, n_layers, calls = eng.method, eng.spec.n_layers, [0]
    inner, attend = getattr(m, name), m.attend

    def counting_attend(state, *a, **k):
        calls[0] += 1
        return attend(state, *a, **k)

    def observed(*a):
        result = inner(*a)
        observe((calls[0] - 1) % n_layers, result, *a)
        return result

    own = {k: vars(m)[k] for k in (name, "attend") if k in vars(m)}  # instance attributes to put back
    setattr(m, name, observed)
    m.attend = counting_attend
    try:
        return eng.generate(sample.input_ids, new_tokens, int(cfg.chunk_size), list(lm.stop_token_ids))
    finally:
        for k in (name, "attend"):
            if k in own:
                setattr(m, k, own[k])
            else:
                delattr(m, k)
