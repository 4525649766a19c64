"""Shared helpers of the method tests: the tiny models built sharp, a random prompt, and one engine run."""

from __future__ import annotations

import functools

import torch
from omegaconf import OmegaConf

from infllm_eval.engine import Engine


def conf_params(method: str) -> dict:
    """`method.params` of conf/method/<method>.yaml as composed: the code holds no defaults, so a method built
    directly takes every key from its config."""
    from infllm_eval.config import compose

    return OmegaConf.to_container(compose([f"method={method}"]).method.params)


ARCHS = ["tiny-llama", "tiny-mistral", "tiny-qwen2"]  # GQA (llama, mistral) and non-GQA (qwen2)

#: std of the tiny models' random weights in these tests. At transformers' default (0.02, the tiny configs' value)
#: attention is near-uniform and logits have std ~0.17, so a wrong query position or a dropped block moves logits by
#: little more than the tolerance; at 0.2 attention scores spread over several units and logits have std ~1.6
SHARP = 0.2


@functools.lru_cache(maxsize=None)
def tiny(name: str):  # also loads "smollm2"
    from infllm_eval.config import compose
    from infllm_eval.models import load_model

    sharp = [f"model.tiny.initializer_range={SHARP}"] if name.startswith("tiny-") else []
    return load_model(compose([f"model={name}", *sharp]).model, device="cpu", dtype="float32").model


def prompt(model, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (n,), generator=g)


def run(model, method, ids, chunk_size, new_tokens=6):
    """-> (logits after the prompt, greedy tokens)"""
    eng = Engine(model, method, torch.device("cpu"), torch.float32)
    logits = eng.prefill(eng.new_states(), ids, chunk_size)
    return logits, eng.generate(ids, new_tokens, chunk_size, stop_ids=[]).tokens


def hf_greedy(model, ids, n):
    """The unpatched model: full recompute per step (no cache), argmax."""
    x = ids[None]
    out = []
    with torch.no_grad():
        logits0 = model(x).logits[0, -1]
        for _ in range(n):
            t = int(model(x).logits[0, -1].argmax())
            out.append(t)
            x = torch.cat([x, torch.tensor([[t]])], 1)
    return logits0, out


@torch.no_grad()
def run_steps(model, method, ids, chunk_size, new_tokens=6):
    """-> (logits [new_tokens, V] of every decoded position: after the prompt, then after each greedy token fed
    back, greedy tokens). Comparing all of them checks decoding steps after the first by logits, not only argmax."""
    eng = Engine(model, method, torch.device("cpu"), torch.float32)
    states = eng.new_states()
    n = ids.shape[0]
    logits = [eng.prefill(states, ids, chunk_size)]
    tokens = []
    for i in range(new_tokens - 1):
        tokens.append(int(torch.argmax(logits[-1])))
        logits.append(eng.forward(states, torch.tensor([[tokens[-1]]]), n + i, logits=True))
    tokens.append(int(torch.argmax(logits[-1])))
    return torch.stack(logits), tokens


def assert_equals_full(arch: str, method, n: int = 200, chunk: int = 16, tol: float = 1e-4) -> None:
    """`method` on an n-token prompt gives full attention's logits (every decoded position) and tokens."""
    from infllm_eval.methods.full import FullAttention

    m = tiny(arch)
    ids = prompt(m, n)
    full_logits, full_tokens = run_steps(m, FullAttention(**conf_params("full")), ids, chunk)
    logits, tokens = run_steps(m, method, ids, chunk)
    assert (logits - full_logits).abs().max() <= tol
    assert tokens == full_tokens


def assert_independent_of(arch: str, make, variants, n: int = 200, seed: int = 3, tol: float = 1e-5) -> None:
    """make(**overrides) -> method; variants: [(chunk_size, overrides)]: every variant gives the first one's logits
    (every decoded position)."""
    m = tiny(arch)
    ids = prompt(m, n, seed=seed)
    runs = [run_steps(m, make(**o), ids, c)[0] for c, o in variants]
    assert all((r - runs[0]).abs().max() <= tol for r in runs)
