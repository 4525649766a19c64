"""InfLLM-V2 (training-free) against its dense reference (tests/infllmv2_reference.py), on the tiny models.

Small parameters keep the original's ratios (level-1 kernel = 2 strides, block = 4 strides, level 2 = 4x level 1):
kernel 4 / stride 2, level 2 16 / 8, blocks of 8, 1 init block + 2 local blocks (+ the query's own), topk 6, so
k_eff = 8 blocks (64 tokens) and a 300-token input is ~5x the budget; blocks picked by score: 6 - 1 - 1 = 4.
"""

from __future__ import annotations

import pytest
import torch
from infllmv2_reference import DenseInfLLMv2
from method_helpers import ARCHS, conf_params, prompt, run_steps, tiny

from infllm_eval.errors import UserError
from infllm_eval.methods import make_method
from infllm_eval.methods.base import ModelSpec
from infllm_eval.methods.full import FullAttention
from infllm_eval.methods.infllmv2 import InfLLMv2

SMALL = dict(conf_params("infllmv2"), kernel_size=4, kernel_stride=2, block_size=8, window_size=16, init_blocks=1,
             topk=6, dense_len=-1)
FULL = conf_params("full")
TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def _compare(arch, params, n, chunk, steps=6, seed=1):
    m = tiny(arch)
    ids = prompt(m, n, seed=seed)
    logits, tokens = run_steps(m, InfLLMv2(**params), ids, chunk, steps)
    ref_logits, ref_tokens = run_steps(m, DenseInfLLMv2(**params), ids, chunk, steps)
    assert (logits - ref_logits).abs().max() <= TOL  # every decoded position: after the prompt and each step
    assert tokens == ref_tokens
    return logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk", [7, 64, 299])  # 7 splits the blocks (8) and the level-2 kernels (16 / 8)
def test_matches_dense_reference(arch, chunk):
    """300 tokens, decoding t = 299..304 across the level-2 kernel that ends at 303 (= 8 * 36 + 15)."""
    logits = _compare(arch, SMALL, 300, chunk)
    full, _ = run_steps(tiny(arch), FullAttention(**FULL), prompt(tiny(arch), 300, seed=1), chunk, 6)
    assert (logits - full).abs().max() > 1e-3  # the selection really is in play


@pytest.mark.parametrize("option", [dict(lse_mode="exact"), dict(quirk_15mod16=True), dict(score_bf16=True),
                                    dict(use_nope=True), dict(init_blocks=0, window_size=8, topk=3)])
def test_switches_match_dense_reference(option):
    """Chunks of 7: calls end at 63, 119, 175 = 7 (mod 8), where the quirk hides a kernel at both levels."""
    _compare("tiny-mistral", dict(SMALL, **option), 203, 7)  # decoding: calls ending at 203 .. 208, 207 = 7 (mod 8)


@pytest.mark.parametrize("n,dense_len,chunk", [
    (62, -1, 13), (70, -1, 13),  # decoding through qb = 7, 8, 9: the last dense-equivalent block is k_eff - 1 = 7
    (127, 128, 64), (128, 128, 64), (129, 128, 13), (129, 128, 200),  # calls ending around dense_len
])
def test_dense_switch_and_boundary_blocks_match_dense_reference(n, dense_len, chunk):
    _compare("tiny-llama", dict(SMALL, dense_len=dense_len), n, chunk)


def _bound(arch, cls, params):
    m = tiny(arch)
    c = m.config
    method = cls(**params)
    method.validate()
    method.bind(m, ModelSpec(c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
                             c.hidden_size // c.num_attention_heads, torch.device("cpu"), torch.float32))
    return method


def _attend_all(method, calls, H, Hkv, D, seed=0):
    """Every query's output of one layer over calls of the given sizes, random sharp q / k / v: [H, N, D]."""
    g = torch.Generator().manual_seed(seed)
    N = sum(calls)
    q, k, v = (torch.randn(1, h, N, D, generator=g) * x for h, x in ((H, 2), (Hkv, 4), (Hkv, 2)))
    state, outs, p0 = method.new_state(0), [], 0
    for n in calls:
        sl = slice(p0, p0 + n)
        outs.append(method.attend(state, q[:, :, sl], k[:, :, sl], v[:, :, sl], torch.arange(p0, p0 + n))[0].clone())
        p0 += n
    return torch.cat(outs, 1)


# call ends 63, 135, 239 = 7 (mod 8): multi-token calls where the quirk hides a kernel at both levels; then one-token
# calls (decoding: no quirk; enough of them that a quirk there would change some query's blocks) ending at 240 .. 335
CALLS = [63, 72, 1, 64, 39] + [1] * 96


@pytest.mark.parametrize("option", [{}, dict(lse_mode="exact")])
def test_every_query_and_selection_match_the_reference_and_the_quirk_changes_them(option):
    """One layer, all queries of every call (not only the last one's logits) and the chosen blocks themselves
    (recorded from the implementation's stage 1 vs the reference's I_g(t)), with the quirk off and on."""
    outs, chosen = {}, {}
    for quirk in (False, True):
        params = dict(SMALL, quirk_15mod16=quirk, **option)
        impl, ref = _bound("tiny-llama", InfLLMv2, params), _bound("tiny-llama", DenseInfLLMv2, params)
        picked = []
        select = impl._select

        def spy(st, q, t, lag, select=select, picked=picked):
            sel = select(st, q, t, lag)
            picked.extend((0, int(ti), g, sel[g, i].nonzero().flatten().tolist())
                          for i, ti in enumerate(t) for g in range(sel.shape[0]))
            return sel

        impl._select = spy
        ref.chosen = []
        out = _attend_all(impl, CALLS, 4, 2, 16)
        assert (out - _attend_all(ref, CALLS, 4, 2, 16)).abs().max() <= TOL
        sparse = [c for c in ref.chosen if c[1] >= 64]  # before k_eff * block_size every past block is chosen
        assert sorted(picked) == sorted(sparse) and len(picked) == 2 * (sum(CALLS) - 64)
        outs[quirk], chosen[quirk] = out, picked
    assert (outs[True] - outs[False]).abs().max() > 1e-3 and chosen[True] != chosen[False]


def test_chunking_changes_nothing_without_the_quirk():
    """Per-query semantics (dense_len -1): a query's selection depends on its position only, not on the calls."""
    m = tiny("tiny-llama")
    ids = prompt(m, 300, seed=4)
    runs = [run_steps(m, InfLLMv2(**SMALL), ids, c, 3)[0] for c in (5, 64, 299)]
    assert all((r - runs[0]).abs().max() <= 1e-5 for r in runs)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cover", [dict(topk=40), dict(dense_len=400)])
def test_budget_covering_the_input_equals_full(arch, cover):
    """40 + 2 blocks of 8 > 300 tokens: every query has all its blocks; or every call below dense_len is dense."""
    m = tiny(arch)
    ids = prompt(m, 300)
    full, full_tokens = run_steps(m, FullAttention(**FULL), ids, 64)
    logits, tokens = run_steps(m, InfLLMv2(**dict(SMALL, **cover)), ids, 64)
    assert (logits - full).abs().max() <= TOL and tokens == full_tokens


def test_fattn_false_gives_the_same_outputs():
    m = tiny("tiny-llama")
    ids = prompt(m, 200)
    a, _ = run_steps(m, InfLLMv2(**SMALL), ids, 64, 3)
    b, _ = run_steps(m, InfLLMv2(**dict(SMALL, fattn=False)), ids, 64, 3)
    assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("bad,match", [
    (dict(block_size=9), "multiple of kernel_stride"),
    (dict(topk=1), "must exceed init_blocks"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(window_size=-8), "window_size"),
    (dict(dense_len=-2), "dense_len"),
    (dict(lse_mode="approx"), "lse_mode"),
    (dict(quirk_15mod16="yes"), "quirk_15mod16"),
    (dict(use_nope=None), "use_nope"),
    (dict(score_bf16=1), "score_bf16"),
])
def test_invalid_parameters_rejected_in_one_sentence(bad, match):
    with pytest.raises(UserError, match=match) as e:
        make_method({"name": "infllmv2", "impl": "infllmv2", "params": dict(SMALL, **bad)})
    assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")


def test_config_preset_and_accounting():
    from infllm_eval.config import compose

    method = make_method(compose(["method=infllmv2"]).method)
    assert method.describe()["topk"] == 64 and method.describe()["quirk_15mod16"] is False
    smol = compose(["model=smollm2", "method=infllmv2"])
    assert smol.invocation.per_model == "smollm2_infllmv2"
    m = make_method(smol.method)
    m.bind(tiny("tiny-llama"), ModelSpec(2, 4, 2, 16, torch.device("cpu"), torch.float32))
    assert m.k_eff == 96 and m.n_free == 62  # the original's 64 + 2048 / 64 blocks, 1 + 33 of them forced
    assert m.attended_keys(100) == 101 and m.attended_keys(20000) == 95 * 64 + 20000 % 64 + 1
    mem = m.memory_model(32768, 8192, "cpu")
    assert mem["device_tokens"] == 32768 + (2047 + 511 + 1) // 2 and mem["host_tokens"] == 0
    assert mem["workspace_keys"] == 32768
    assert m.memory_model(4096, 4096, "cpu")["workspace_keys"] == 4096
