"""SirLLM against its dense reference (tests/sirllm_reference.py), its invariants, its parameters, and the engine's
token-surprisal contract (`wants_token_nll`)."""

from __future__ import annotations

import math

import pytest
import torch
from method_helpers import ARCHS, conf_params, prompt, run_steps, tiny
from sirllm_reference import reference_steps

import infllm_eval.engine as engine_mod
from infllm_eval.engine import Engine
from infllm_eval.errors import UserError
from infllm_eval.methods import METHODS, make_method

TOL = 1e-4
N_PROMPT = 200  # ~4.5x the cache below
SMALL = {"start_size": 4, "recent_size": 0, "token_entropy_size": 40}  # cache 44


def sirllm(**over):
    p = {**conf_params("sirllm"), **SMALL, **over}
    m = METHODS.get("sirllm")(**p)
    m.validate()
    return m


def full_logits(model, ids, chunk):
    return run_steps(model, METHODS.get("full")(**conf_params("full")), ids, chunk)[0]


#: (chunk, switches): chunk 1, one that does not divide the cache (7), one that does (11 x 4 = 44), one near the
#: limit (40 = cache - start); every switch off its default somewhere
CASES = [
    (1, {}),
    (7, {"decay_ratio": 0.7, "recent_size": 8}),
    (11, {"first_token": "call_max"}),
    (16, {"entropy_shift_fix": False}),
    (7, {"entropy_shift_fix": False, "first_token": "call_max", "start_size": 0}),
    (40, {"decay_ratio": 0.8, "decay_per": "token", "start_size": 2, "recent_size": 3}),
    (16, {"fattn": False, "q_tile": 3}),  # the explicit tiled path, tiles that split every call
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk,over", CASES)
def test_equals_dense_reference(arch, chunk, over):
    """Logits of every decoded position, the greedy tokens, and the entropy list the cache ends with, equal the
    reference's; eviction is in play (the run differs from full attention)."""
    model = tiny(arch)
    ids = prompt(model, N_PROMPT)
    method = sirllm(**over)
    eng = Engine(model, method, torch.device("cpu"), torch.float32)
    states = eng.new_states()
    n = ids.shape[0]
    got = [eng.prefill(states, ids, chunk)]
    for i in range(5):
        got.append(eng.forward(states, torch.tensor([[int(got[-1].argmax())]]), n + i, logits=True))
    got = torch.stack(got)
    want, _, ref = reference_steps(model, method.params, ids, chunk, 6)
    assert (got.double() - want).abs().max().item() <= TOL
    ent = states[0]["sample"].ent
    assert ent.shape[0] == len(ref.ent) == method.cache_size  # the full cache, entropies of the last call included
    assert torch.allclose(ent, torch.tensor(ref.ent, dtype=torch.float64), atol=1e-4)
    assert (got - full_logits(model, ids, chunk)).abs().max().item() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_switches_change_outputs(arch):
    """Each non-default switch moves the logits by far more than the tolerance on the reference-checked inputs (so
    a switch the code ignored would fail `test_equals_dense_reference`)."""
    model = tiny(arch)
    ids = prompt(model, N_PROMPT)
    base = run_steps(model, sirllm(), ids, 7)[0]
    for over in ({"decay_ratio": 0.7}, {"first_token": "call_max"}, {"entropy_shift_fix": False},
                 {"start_size": 0}, {"recent_size": 8}):
        assert (run_steps(model, sirllm(**over), ids, 7)[0] - base).abs().max().item() > 1e-2, over


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk", [1, 13, 64])
def test_cache_covering_input_equals_full(arch, chunk):
    model = tiny(arch)
    ids = prompt(model, 120)
    got = run_steps(model, sirllm(token_entropy_size=200), ids, chunk)[0]
    assert (got - full_logits(model, ids, chunk)).abs().max().item() <= TOL


def test_token_nll_contract_tiled(monkeypatch):
    """The engine's surprisals: nll[j] = -log p(x[j] | x[<j]) and nll_own[j] = -log softmax(z[j])[x[j]] from the
    model's logits at every position, the first token of a call from the previous call's last logits (NaN at
    position 0), identical whether the LM head runs in one tile or in tiles of 3 rows."""
    model = tiny("tiny-llama")
    ids = prompt(model, 30)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[None]).logits[0].double(), -1)  # [30, V]
    want = torch.tensor([math.nan] + [-float(logp[j - 1, ids[j]]) for j in range(1, 30)])
    want_own = torch.tensor([-float(logp[j, ids[j]]) for j in range(30)])
    for tile_bytes in (engine_mod.NLL_TILE_BYTES, 3 * 4 * model.config.vocab_size):
        monkeypatch.setattr(engine_mod, "NLL_TILE_BYTES", tile_bytes)
        seen = []
        method = sirllm(token_entropy_size=100)
        method.observe_token_nll = lambda states, nll, own: seen.append((nll.clone(), own.clone()))
        eng = Engine(model, method, torch.device("cpu"), torch.float32)
        states = eng.new_states()
        eng.forward(states, ids[None, :17], 0, logits=False)
        last = eng.forward(states, ids[None, 17:], 17, logits=True)
        nll, own = torch.cat([s[0] for s in seen]).double(), torch.cat([s[1] for s in seen]).double()
        assert math.isnan(nll[0]) and (nll[1:] - want[1:]).abs().max() < 1e-4
        assert (own - want_own).abs().max() < 1e-4
        assert (torch.log_softmax(last.double(), -1) - logp[-1]).abs().max() < 1e-4


def test_other_methods_pay_nothing(monkeypatch):
    """A method that does not want surprisals never gets the hook and its LM head runs on one row."""
    model = tiny("tiny-llama")
    calls = []
    monkeypatch.setattr(Engine, "_token_nll", lambda *a: calls.append(a))
    for name in ("full", "streamingllm", "infllm"):
        assert not METHODS.get(name).wants_token_nll
        eng = Engine(model, METHODS.get(name)(**conf_params(name)), torch.device("cpu"), torch.float32)
        eng.prefill(eng.new_states(), prompt(model, 40), 16)
    assert calls == []


def test_eviction_keeps_shared_state_bounded():
    """Every layer holds the same number of tokens, at most cache_size after a call; kv_bytes counts them."""
    model = tiny("tiny-mistral")
    method = sirllm()
    eng = Engine(model, method, torch.device("cpu"), torch.float32)
    states = eng.new_states()
    eng.prefill(states, prompt(model, N_PROMPT), 16)
    lens = {s["kv"].len for s in states}
    assert lens == {method.cache_size} and all(s["sample"] is states[0]["sample"] for s in states)
    s = eng.spec
    assert method.kv_bytes(states)["device"] == 2 * s.n_layers * s.n_kv_heads * s.head_dim * 4 * method.cache_size


def test_attention_workspace_is_bounded(monkeypatch):
    """A query tile is scored against at most cache_size keys, however long the input."""
    import infllm_eval.methods.sirllm as mod

    seen, real = [], mod.multi_stage_attention

    def spy(stages, q_pos, scale, q_tile, fused=True, out=None):
        seen.append(sum(st.k.shape[2] for st in stages))
        return real(stages, q_pos, scale, q_tile, fused, out)

    monkeypatch.setattr(mod, "multi_stage_attention", spy)
    model = tiny("tiny-llama")
    for n in (150, 450):
        seen.clear()
        run_steps(model, sirllm(), prompt(model, n), 16, new_tokens=3)
        assert max(seen) == sirllm().cache_size


@pytest.mark.parametrize("key,value", [
    ("start_size", -1), ("token_entropy_size", 0), ("recent_size", 1.5), ("decay_ratio", 0), ("decay_ratio", 1.5),
    ("decay_per", "turn"), ("first_token", "max"), ("entropy_shift_fix", "yes"),
])
def test_invalid_params_refused(key, value):
    with pytest.raises(UserError, match=f"method.params.{key}"):
        sirllm(**{key: value})


def test_chunk_larger_than_cache_refused():
    method = sirllm()
    method.check_chunk_size(40)
    with pytest.raises(UserError, match="chunk_size <= cache_size - start_size = 40"):
        method.check_chunk_size(41)
    model = tiny("tiny-llama")
    eng = Engine(model, method, torch.device("cpu"), torch.float32)
    with pytest.raises(UserError, match="chunk_size"):
        eng.prefill(eng.new_states(), prompt(model, 100), 64)


def test_config_ls_plan_describe():
    from infllm_eval.commands.plan import estimate
    from infllm_eval.config import compose

    cfg = compose(["method=sirllm", "model=smollm2", "chunk_size=512"])
    method = make_method(cfg.method)
    assert method.params["token_entropy_size"] == 6140 and method.cache_size == 6144  # SmolLM2 preset
    d = method.describe()
    for key in ("start_size", "recent_size", "token_entropy_size", "decay_ratio", "decay_per", "first_token",
                "entropy_shift_fix"):
        assert key in d
    assert method.memory_model(16384, 512, "cpu")["device_tokens"] == 6144
    assert method.attended_keys(10) == 11 and method.attended_keys(10**5) == 6144
    assert estimate(cfg, 16384, "cpu")["kv_device"] > 0
    assert "sirllm" in METHODS.names()
