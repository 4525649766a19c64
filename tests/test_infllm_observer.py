"""InfLLM's observation hook (`InfLLM.observer`, used by probes/): it sees every scored lookup and every packed unit
with the data the probes read, outputs stay bit-identical with it on, and attaching / detaching patches nothing."""

from __future__ import annotations

import functools

import torch

from infllm_eval.engine import Engine
from infllm_eval.methods.infllm import InfLLM


def _small() -> dict:
    """conf/method/infllm.yaml's parameters (every key a method reads) with a small window and memory."""
    from infllm_eval.config import compose

    params = dict(compose(["method=infllm"]).method.params)
    return {**params, **dict(n_local=64, n_init=8, topk=3, block_size=16, repr_topk=2, exc_block_size=32,
                            max_cached_block=4, offload=False)}


SMALL = _small()


@functools.lru_cache(maxsize=None)
def _tiny():
    from infllm_eval.config import compose
    from infllm_eval.models import load_model

    return load_model(compose(["model=tiny-llama"]).model, device="cpu", dtype="float32").model


def _run(method: InfLLM, n_prompt: int = 300, n_new: int = 4):
    """Prefill seeded ids in 64-token chunks, then decode greedily -> (logits after each step, final states)."""
    model = _tiny()
    ids = torch.randint(3, model.config.vocab_size, (n_prompt,), generator=torch.Generator().manual_seed(3))
    eng = Engine(model, method, torch.device("cpu"), torch.float32)
    states = eng.new_states()
    logits = [eng.prefill(states, ids, 64)]
    for i in range(n_new):
        tok = logits[-1].argmax().view(1, 1)
        logits.append(eng.forward(states, tok, n_prompt + i, logits=True))
    return torch.stack(logits), states


def test_observer_sees_lookups_and_units_and_leaves_outputs_bit_identical():
    before = dict(vars(InfLLM))
    base, _ = _run(InfLLM(**SMALL))

    events: list[tuple[str, int, dict]] = []
    method = InfLLM(**SMALL)
    method.observer = lambda event, layer, **data: events.append(
        (event, layer, {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in data.items()}))
    observed, states = _run(method)
    method.observer = None

    assert torch.equal(observed, base)
    assert dict(vars(InfLLM)) == before and InfLLM.observer is None  # nothing patched on the class
    assert "observer" not in vars(InfLLM(**SMALL))

    n_layers, H, D = len(states), 4, 16
    for layer in range(n_layers):
        units = [d for e, lyr, d in events if e == "unit" and lyr == layer]
        lookups = [d for e, lyr, d in events if e == "lookup" and lyr == layer]
        assert len(units) == states[layer]["units"].n > SMALL["topk"]  # every packed unit, once
        assert units[0]["keys"].shape == (1, 2, SMALL["block_size"], D)
        assert units[0]["scores"].shape == (1, H, SMALL["block_size"])
        decoding = [d for d in lookups if d["n_queries"] == 1]
        assert len(decoding) == 1 + 4  # the last prompt token and the 4 decoded tokens
        last = decoding[-1]
        assert last["query"].shape == (1, H, D) and last["scores"].shape == (1, H, len(units))
        # the selection is the topk units by summed score, as reported
        assert last["selection"] == [sorted(last["scores"][0].sum(0).topk(SMALL["topk"]).indices.tolist())]
        # the scores are the query against representatives rebuilt from the observed units (what repr_ranks does)
        reps = []
        for u in units:
            idx = u["scores"][0].topk(SMALL["repr_topk"], dim=-1).indices  # [H, r]
            k_h = u["keys"][0].repeat_interleave(2, dim=0)  # [H, bs, D]
            reps.append(torch.gather(k_h, 1, idx[..., None].expand(-1, -1, D)).mean(dim=1))
        rebuilt = torch.einsum("hd,uhd->hu", last["query"][0], torch.stack(reps))
        torch.testing.assert_close(rebuilt, last["scores"][0], rtol=1e-5, atol=1e-5)

    n_events = len(events)
    _run(method)  # detached: no further calls
    assert len(events) == n_events
