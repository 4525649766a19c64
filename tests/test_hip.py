"""HiP v1.0 (`method=hip`) against its slow scalar reference (tests/hip_reference.py): logits of every decoded
position, on GQA and non-GQA tiny models, chunk sizes that split query blocks, and every switch; plus the
full-budget and small-budget invariants and parameter validation."""

from __future__ import annotations

import pytest
import torch

from infllm_eval.errors import UserError
from infllm_eval.methods import METHODS
from infllm_eval.methods.hip_mask import estimate
from tests.hip_reference import DenseHiP
from tests.method_helpers import conf_params, prompt, run_steps, tiny

N_PROMPT = 100  # > 3x the attended keys at SMALL (16 selected + 8 window + 4 sink)
SMALL = dict(mask_k=16, block_size_q=4, block_size_k=2, sliding_window_size=8, num_sink=2, dense_queries_exp=0)


def hip(**over):
    params = {**conf_params("hip"), **SMALL, **over}
    m = METHODS.get("hip")(**params)
    m.validate()
    return m, params


def compare(arch, chunk, n=N_PROMPT, **over):
    model = tiny(arch)
    method, params = hip(**over)
    ids = prompt(model, n)
    got, toks = run_steps(model, method, ids, chunk, new_tokens=4)
    want, ref_toks = run_steps(model, DenseHiP(**params), ids, chunk, new_tokens=4)
    diff = float((got - want).abs().max())
    assert toks == ref_toks, f"greedy tokens differ, max |diff| {diff:.3g}"
    return diff


@pytest.mark.parametrize("arch,chunk", [("tiny-llama", 13), ("tiny-llama", 50), ("tiny-llama", 1000),
                                        ("tiny-mistral", 50), ("tiny-mistral", 1000), ("tiny-qwen2", 13),
                                        ("tiny-qwen2", 1000)])
def test_matches_reference(arch, chunk):  # 13, 50 (and 33 below) split the 4-query blocks; 1000: one prefill call
    assert compare(arch, chunk) <= 1e-4


@pytest.mark.parametrize("over", [
    dict(enable_sparq=True, sparq_hid=8, sparq_start_bk=1, sparq_start_tsrc=1),
    dict(mask_k=32, estimator_lower_resolution=2, estimator_lower_resolution_stop_n_blocks=8),
    dict(mask_k=48, block_size_k=1, ksrc_stride=None),  # round(48 / 16) = 3 source grids in decoding
    dict(pixel_slot_quirk=False),
    dict(dense_queries_exp=None),  # the original's per-call dense threshold (~190 at T=120, mask_k=16: all dense)
    dict(dense_queries_exp=60, reduce_stride=1, w_start=24, n_patches=4),
], ids=["sparq", "lower-resolution", "ksrc-stride", "packed-slots", "dense-default", "dense-60-stride1"])
def test_switches_match_reference(over):
    assert compare("tiny-mistral", 33, **over) <= 1e-4


def test_full_budget_equals_full():
    model = tiny("tiny-mistral")
    ids = prompt(model, N_PROMPT)
    # the window covers the input: sink, window and selected blocks must not count a key twice. (mask_k >= T is not
    # dense in the original: its fp32 ceil(fl32(i / n) * T / bk) can round a node onto the next block, one block
    # is then skipped, e.g. T = 26, key block 14; tests/test_hip.py::test_large_budget_skips_like_the_kernel)
    method, _ = hip(sliding_window_size=256)
    full = METHODS.get("full")(**conf_params("full"))
    full.validate()
    got, _ = run_steps(model, method, ids, 32, new_tokens=4)
    want, _ = run_steps(model, full, ids, 32, new_tokens=4)
    assert float((got - want).abs().max()) <= 1e-4


def test_large_budget_skips_like_the_kernel():
    from infllm_eval.methods.hip_mask import MaskConfig, estimate

    cfg = MaskConfig(mask_k=512, w_start=1024, n_patches=256, scale_up=2, bq=1, bk=2, reduce_stride=2,
                     sliding_window_size=8, grid=1, sparq_hid=None, lower_resolution=1, pixel_slot_quirk=True)
    for T, missing in ((26, 14), (24, None)):
        starts, count = estimate(torch.randn(1, 1, 8), torch.randn(1, T, 8), cfg)
        got = set(starts[0, 0, : int(count[0, 0])].tolist())
        assert set(range(0, T, 2)) - got == ({missing} if missing is not None else set())


def test_small_budget_departs_from_full():
    model = tiny("tiny-llama")
    ids = prompt(model, N_PROMPT)
    full = METHODS.get("full")(**conf_params("full"))
    full.validate()
    got, _ = run_steps(model, hip()[0], ids, 32, new_tokens=4)
    want, _ = run_steps(model, full, ids, 32, new_tokens=4)
    assert float((got - want).abs().max()) > 1e-3


@pytest.mark.parametrize("over,msg", [
    (dict(sampling_method="random"), "sampling_method"),
    (dict(reduce_method="sum"), "reduce_method"),
    (dict(mask_k=0), "mask_k"),
    (dict(n_patches=32), "n_patches"),
    (dict(sliding_window_size=2), "sliding_window_size"),
    (dict(scale_up=1), "scale_up"),
    (dict(enable_sparq="yes"), "enable_sparq"),
    (dict(w_start=100), "w_start"),
])
def test_validate_refuses(over, msg):
    with pytest.raises(UserError, match=msg) as e:
        hip(**over)
    assert str(e.value).count(". ") == 0  # one sentence


def test_accounting():
    method, _ = hip()
    assert method.attended_keys(10_000) == 16 + 8 + 4
    mm = method.memory_model(32768, 8192, "cpu")
    assert mm["device_tokens"] == 32768 and mm["host_tokens"] == 0
    assert 0 < mm["workspace_keys"] <= 32768
    assert method.describe()["name"] == "hip"


def test_dense_queries_threshold():
    method, _ = hip(dense_queries_exp=60)
    assert [method.dense_queries(L, T) for L, T in ((33, 33), (33, 66), (32, 66), (40, 200))] == [33, 27, 0, 0]
    method, _ = hip(mask_k=512, dense_queries_exp=None)  # the original's int((log2(T/k/2) k + k) 3): 9216 at 32K
    assert method.dense_queries(8192, 32768) == 0 and method.dense_queries(8192, 10240) == 6638 - 2048
    assert method.dense_queries(4096, 4096) == 4096


@pytest.mark.parametrize("over", [dict(), dict(enable_sparq=True, sparq_hid=32, sparq_start_bk=1, sparq_start_tsrc=1),
                                  dict(ksrc_stride=3, pixel_slot_quirk=False)], ids=["plain", "sparq-32", "grids"])
def test_selection_matches_reference_head_dim_64(over):
    """The block selection alone on random data with head_dim 64 (the tiny models have 16, so SparQ's 32 dims with
    half of them in the first iteration only show here), several query blocks, 2 KV heads x 2 query heads."""
    params = {**conf_params("hip"), **SMALL, "mask_k": 32, **over}
    method = METHODS.get("hip")(**params)
    method.validate()
    g = torch.Generator().manual_seed(1)
    L, T = 24 if over.get("ksrc_stride") else 40, 300
    q, keys = torch.randn(4, L, 64, generator=g), torch.randn(2, T, 64, generator=g)
    cfg, _ = method.mask_config(L, T)
    starts, count = estimate(q, keys, cfg)
    ref = DenseHiP(**params)
    for h in range(4):
        for b in range(starts.shape[1]):
            want = ref.select(q[h].double(), keys[h // 2].double(), b, cfg.bq, cfg.bk, T, L)
            assert starts[h, b, : int(count[h, b])].tolist() == want
