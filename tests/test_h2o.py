"""H2O (kvpress's ObservedAttentionPress) against its dense reference (tests/h2o_reference.py) on the tiny models,
and its invariants. The context of a 200-token prompt is 199 tokens: ratio 0.75 keeps int(199 * 0.25) = 49 keys per
KV head, so the input is ~4x the budget."""

from __future__ import annotations

import pytest
import torch
from h2o_reference import DenseH2O
from method_helpers import (
    ARCHS,
    assert_equals_full,
    assert_independent_of,
    conf_params,
    prompt,
    run_steps,
    tiny,
)

from infllm_eval.engine import Engine
from infllm_eval.errors import UserError
from infllm_eval.methods import make_method
from infllm_eval.methods.full import FullAttention
from infllm_eval.methods.h2o import H2O

FULL = conf_params("full")
SMALL = dict(conf_params("h2o"), compression_ratio=0.75, kept_tokens=None)
TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def _compare(arch, params, chunk, n=200, seed=1, steps=6):
    """-> (kept sets, the method's logits of every decoded position, full attention's); asserts it equals the
    reference: logits, tokens and the kept sets."""
    m = tiny(arch)
    ids = prompt(m, n, seed=seed)
    impl, ref = H2O(**params), DenseH2O(**params)
    impl.kept, ref.kept = [], []
    logits, tokens = run_steps(m, impl, ids, chunk, steps)
    ref_logits, ref_tokens = run_steps(m, ref, ids, chunk, steps)
    assert (logits - ref_logits).abs().max() <= TOL
    assert tokens == ref_tokens
    assert [(layer, idx.tolist()) for layer, idx in impl.kept] == ref.kept
    return ref.kept, logits, run_steps(m, FullAttention(**FULL), ids, chunk, steps)[0]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk", [5, 24, 77])  # column sums accumulated over 40, 9 and 3 calls
def test_h2o_matches_dense_reference(arch, chunk):
    _, logits, full = _compare(arch, SMALL, chunk)
    assert (logits - full).abs().max() > 1e-3  # the compression really is in play
    assert (logits[0] - full[0]).abs().max() > 1e-3  # already for the last prompt token: compressed before it


@pytest.mark.parametrize("arch,switch,chunk", [
    ("tiny-mistral", dict(kept_tokens=30, compression_ratio=None), 7),  # a fixed budget instead of the ratio
    ("tiny-qwen2", dict(compression_ratio=0.5), 1),  # one token per prefill call
    ("tiny-llama", dict(compression_ratio=0.9, q_tile=5, fattn=False), 64),
])
def test_h2o_switches_match_dense_reference(arch, switch, chunk):
    _, logits, full = _compare(arch, dict(SMALL, **switch), chunk)
    assert (logits - full).abs().max() > 1e-3


def test_no_recent_window_is_protected():
    """kvpress's press protects no window: some KV head drops one of the last 16 context tokens (which SnapKV keeps)."""
    kept = _compare("tiny-llama", SMALL, 24)[0]
    assert any(not set(range(183, 199)) <= set(s) for _, heads in kept for s in heads)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("budget", [dict(compression_ratio=0.0), dict(compression_ratio=None, kept_tokens=500)])
def test_budget_covering_input_equals_full(arch, budget):
    assert_equals_full(arch, H2O(**dict(SMALL, **budget)))


def test_a_one_token_prompt_has_nothing_to_compress():
    assert_equals_full("tiny-qwen2", H2O(**SMALL), n=1)


def test_outputs_depend_on_neither_chunk_size_nor_q_tile():
    assert_independent_of("tiny-mistral", lambda **o: H2O(**dict(SMALL, **o)),
                          [(1, dict(q_tile=64)), (24, dict(q_tile=3)), (199, dict(q_tile=16))])


def test_compression_drops_the_evicted_keys():
    m = tiny("tiny-mistral")
    method = H2O(**SMALL)
    eng = Engine(m, method, torch.device("cpu"), torch.float32)
    states = eng.new_states()
    eng.prefill(states, prompt(m, 200), 24)
    s = eng.spec
    per_token = 2 * s.n_kv_heads * s.head_dim * 4  # K and V, fp32
    assert method.kv_bytes(states)["device"] == s.n_layers * (49 + 1) * per_token  # no column sums left either
    assert method.n_keep(1000) == 250 and H2O(**dict(SMALL, compression_ratio=0.9)).n_keep(1000) == 99  # kvpress's


def test_config_and_accounting():
    from infllm_eval.config import compose

    preset = make_method(compose(["method=h2o", "model=smollm2"]).method)
    assert (preset.params["compression_ratio"], preset.params["kept_tokens"]) == (None, 6144)
    method = make_method(compose(["method=h2o", "model=tiny-llama"]).method)
    assert (method.params["compression_ratio"], method.params["kept_tokens"]) == (0.5, None)
    assert method.describe()["name"] == "h2o" and method.describe()["compression_ratio"] == 0.5
    assert method.memory_model(8192, 512, "cpu")["device_tokens"] == 8192


@pytest.mark.parametrize("bad,match", [
    (dict(kept_tokens=100), "must set exactly one of compression_ratio and kept_tokens"),
    (dict(compression_ratio=1), "compression_ratio must be a number in"),
    (dict(compression_ratio=True), "compression_ratio must be a number in"),
    (dict(compression_ratio=None, kept_tokens=-3), "kept_tokens must be a positive integer"),
    (dict(compression_ratio=None, kept_tokens=2.5), "kept_tokens must be a positive integer"),
])
def test_invalid_parameters_rejected(bad, match):
    with pytest.raises(UserError, match=match) as e:
        H2O(**dict(SMALL, **bad)).validate()
    assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")  # one sentence
