"""SnapKV (kvpress's SnapKVPress) against its dense reference (tests/snapkv_reference.py) on the tiny models, and its
invariants. The context of a 200-token prompt is 199 tokens: ratio 0.75 keeps int(199 * 0.25) = 49 keys per KV head
(16 window + 33 by score), so the input is ~4x the budget."""

from __future__ import annotations

import pytest
import torch
from method_helpers import (
    ARCHS,
    assert_equals_full,
    assert_independent_of,
    conf_params,
    prompt,
    run_steps,
    tiny,
)
from snapkv_reference import DenseSnapKV

from infllm_eval.engine import Engine
from infllm_eval.errors import UserError
from infllm_eval.methods import make_method
from infllm_eval.methods.full import FullAttention
from infllm_eval.methods.snapkv import SnapKV

FULL = conf_params("full")
SMALL = dict(conf_params("snapkv"), compression_ratio=0.75, kept_tokens=None, window_size=16, kernel_size=5)
TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def _compare(arch, params, chunk, n=200, seed=1, steps=6):
    """-> (the method's logits of every decoded position, full attention's); asserts it equals the reference,
    logits, tokens and the kept sets."""
    m = tiny(arch)
    ids = prompt(m, n, seed=seed)
    impl, ref = SnapKV(**params), DenseSnapKV(**params)
    impl.kept, ref.kept = [], []
    logits, tokens = run_steps(m, impl, ids, chunk, steps)
    ref_logits, ref_tokens = run_steps(m, ref, ids, chunk, steps)
    assert (logits - ref_logits).abs().max() <= TOL
    assert tokens == ref_tokens
    assert [(layer, idx.tolist()) for layer, idx in impl.kept] == ref.kept
    return logits, run_steps(m, FullAttention(**FULL), ids, chunk, steps)[0]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk", [5, 24, 77])  # 5 and 77 split the 16-token window across calls
def test_snapkv_matches_dense_reference(arch, chunk):
    logits, full = _compare(arch, SMALL, chunk)
    assert (logits - full).abs().max() > 1e-3  # the compression really is in play
    assert (logits[0] - full[0]).abs().max() > 1e-3  # already for the last prompt token: compressed before it


@pytest.mark.parametrize("arch,switch,chunk", [
    ("tiny-mistral", dict(kept_tokens=40, compression_ratio=None), 7),  # a fixed budget instead of the ratio
    ("tiny-qwen2", dict(kernel_size=1), 1),  # no pooling; one token per prefill call
    ("tiny-llama", dict(kernel_size=7, window_size=8), 13),
    ("tiny-mistral", dict(compression_ratio=0.95), 24),  # int(199 * 0.05) = 9 < 16: the window alone is kept
    ("tiny-qwen2", dict(compression_ratio=0.5, window_size=64, kernel_size=3), 50),
])
def test_snapkv_switches_match_dense_reference(arch, switch, chunk):
    logits, full = _compare(arch, dict(SMALL, **switch), chunk)
    assert (logits - full).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("budget", [dict(compression_ratio=0.0), dict(compression_ratio=None, kept_tokens=199),
                                    dict(window_size=256)])  # no compression: ratio 0, all kept, n <= window
def test_budget_covering_input_equals_full(arch, budget):
    assert_equals_full(arch, SnapKV(**dict(SMALL, **budget)))


def test_a_one_token_prompt_has_nothing_to_compress():
    assert_equals_full("tiny-llama", SnapKV(**SMALL), n=1)


def test_outputs_depend_on_neither_chunk_size_nor_q_tile_nor_fattn():
    assert_independent_of("tiny-mistral", lambda **o: SnapKV(**dict(SMALL, **o)),
                          [(1, dict(q_tile=64, fattn=True)), (24, dict(q_tile=3, fattn=False)),
                           (199, dict(q_tile=16, fattn=True))])


def test_compression_drops_the_evicted_keys():
    """After the prompt each layer holds its 49 kept keys + the last prompt token + the decoded tokens, nothing
    more (the context buffer is freed)."""
    m = tiny("tiny-llama")
    method = SnapKV(**SMALL)
    eng = Engine(m, method, torch.device("cpu"), torch.float32)
    states = eng.new_states()
    eng.prefill(states, prompt(m, 200), 24)
    s = eng.spec
    per_token = 2 * s.n_kv_heads * s.head_dim * 4  # K and V, fp32
    assert method.kv_bytes(states)["device"] == s.n_layers * (49 + 1) * per_token
    assert method.attended_keys(150) == 151 and method.attended_keys(205) == 49 + 205 - 199 + 1


def test_keep_count_is_kvpress_formula():
    """int(n * (1 - ratio)) with kvpress's float rounding; the window is always kept."""
    method = SnapKV(**dict(SMALL, compression_ratio=0.9))
    assert method.n_keep(1000) == 99  # 1000 * (1 - 0.9) = 99.99999999999997
    assert method.n_keep(100) == 16 and method.n_keep(10) == 10
    assert SnapKV(**dict(SMALL, compression_ratio=None, kept_tokens=40)).n_keep(30) == 30


def test_config_and_accounting():
    from infllm_eval.config import compose

    preset = make_method(compose(["method=snapkv", "model=smollm2"]).method)
    assert (preset.params["compression_ratio"], preset.params["kept_tokens"]) == (None, 6144)
    method = make_method(compose(["method=snapkv", "model=tiny-llama"]).method)
    p = method.params
    assert (p["compression_ratio"], p["kept_tokens"], p["window_size"], p["kernel_size"]) == (0.5, None, 64, 5)
    d = method.describe()
    assert d["name"] == "snapkv" and d["compression_ratio"] == 0.5 and d["window_size"] == 64
    mem = method.memory_model(16384, 512, "cpu")
    assert mem == {"device_tokens": 16384, "host_tokens": 0, "workspace_keys": 16384}


@pytest.mark.parametrize("bad,match", [
    (dict(kept_tokens=100), "must set exactly one of compression_ratio and kept_tokens"),
    (dict(compression_ratio=None), "must set exactly one of compression_ratio and kept_tokens"),
    (dict(compression_ratio=1.0), "compression_ratio must be a number in"),
    (dict(compression_ratio=-0.1), "compression_ratio must be a number in"),
    (dict(compression_ratio="0.5"), "compression_ratio must be a number in"),
    (dict(compression_ratio=None, kept_tokens=0), "kept_tokens must be a positive integer"),
    (dict(compression_ratio=None, kept_tokens=8), "kept_tokens \\(8\\) must be at least window_size"),
    (dict(window_size=0), "window_size must be a positive integer"),
    (dict(kernel_size=4), "kernel_size must be odd"),
])
def test_invalid_parameters_rejected(bad, match):
    with pytest.raises(UserError, match=match) as e:
        SnapKV(**dict(SMALL, **bad)).validate()
    assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")  # one sentence


@pytest.mark.parametrize("chunk", [1, 7, 500])
def test_end_context_comes_once_between_the_context_and_the_last_prompt_token(chunk):
    """The engine's contract (base.py): every context position goes through attend, then end_context once, then
    one-token calls from the last prompt token on."""
    m = tiny("tiny-llama")
    log = []

    class Spy(SnapKV):
        def attend(self, state, q, k, v, pos, out=None):
            if state["layer"] == 0:
                log.append((int(pos[0]), q.shape[2]))
            return super().attend(state, q, k, v, pos, out)

        def end_context(self, states):
            log.append("end")
            super().end_context(states)

    run_steps(m, Spy(**SMALL), prompt(m, 40), chunk, 3)
    i = log.index("end")
    assert log.count("end") == 1 and sum(n for _, n in log[:i]) == 39 and log[i + 1 :] == [(39, 1), (40, 1), (41, 1)]
