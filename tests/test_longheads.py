"""LongHeads against its dense reference (tests/longheads_reference.py) on the tiny models, and its invariants."""

from __future__ import annotations

import pytest
import torch
from longheads_reference import DenseLongHeads
from method_helpers import ARCHS, conf_params, prompt, run_steps, tiny

from infllm_eval.errors import UserError
from infllm_eval.methods import make_method
from infllm_eval.methods.full import FullAttention
from infllm_eval.methods.longheads import LongHeads

FULL = conf_params("full")
#: chunks of 8, 4 attended per head (0, one top, the last, the partial), selective from 32: a 200-token input is
#: ~6x the budget
SMALL = dict(conf_params("longheads"), window_size=8, atten_length=32, begin_selective_length=32,
             prefill_self_exclusion=False)
#: 3 top chunks, selective from 20 (not a chunk boundary, fewer candidates than top-k until t ~ 40), tiles of 3
#: queries (tiles straddle chunk boundaries; their chunk union is not 0..n-1, so keys are gathered)
ODD = dict(SMALL, atten_length=48, begin_selective_length=20, q_tile=3)


def _compare(arch, params, chunk, n=200, seed=1):
    m = tiny(arch)
    ids = prompt(m, n, seed=seed)
    logits, tokens = run_steps(m, LongHeads(**params), ids, chunk)
    ref_logits, ref_tokens = run_steps(m, DenseLongHeads(**params), ids, chunk)
    assert (logits - ref_logits).abs().max() <= 1e-4  # every decoded position's logits
    assert tokens == ref_tokens
    return logits, run_steps(m, FullAttention(**FULL), ids, chunk)[0]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk", [5, 24, 77])  # 5 and 77 split chunks of 8; 24 is 3 of them
def test_longheads_matches_dense_reference(arch, chunk):
    logits, full = _compare(arch, SMALL, chunk)
    assert (logits - full).abs().max() > 1e-3  # the selection really is in play


@pytest.mark.parametrize("arch,chunk", [("tiny-mistral", 5), ("tiny-mistral", 77), ("tiny-qwen2", 24)])
def test_prefill_self_exclusion_matches_dense_reference(arch, chunk):
    _compare(arch, dict(SMALL, prefill_self_exclusion=True), chunk)


@pytest.mark.parametrize("arch,quirk", [("tiny-mistral", False), ("tiny-qwen2", True)])
def test_longheads_odd_boundaries_match_dense_reference(arch, quirk):
    _compare(arch, dict(ODD, prefill_self_exclusion=quirk), 7, n=150, seed=2)


@pytest.mark.parametrize("chunk", [33, 5])
def test_the_query_at_begin_selective_length_is_selective(chunk):
    """A prompt of B + 1 tokens: its last query (t = B) is the first selective one (25 keys at contiguous
    positions, not the 33 at true positions), and the first decoded logits come straight from it. A threshold
    one too high (t = B dense) fails the first row."""
    m = tiny("tiny-mistral")
    ids = prompt(m, SMALL["begin_selective_length"] + 1, seed=4)
    logits = run_steps(m, LongHeads(**SMALL), ids, chunk, new_tokens=2)[0]
    ref = run_steps(m, DenseLongHeads(**SMALL), ids, chunk, new_tokens=2)[0]
    full = run_steps(m, FullAttention(**FULL), ids, chunk, new_tokens=2)[0]
    assert (logits - ref).abs().max() <= 1e-4
    assert (logits[0] - full[0]).abs().max() > 1e-2  # dense at t = B would give full's first row


@pytest.mark.parametrize("arch", ARCHS)
def test_budget_covering_input_equals_full(arch):
    """atten_length beyond the input: every chunk is selected and the contiguous positions are the true ones, so
    the selective path (from position 8 on) gives full attention."""
    m = tiny(arch)
    ids = prompt(m, 150)
    full_logits, full_tokens = run_steps(m, FullAttention(**FULL), ids, 16)
    logits, tokens = run_steps(m, LongHeads(**dict(SMALL, atten_length=256, begin_selective_length=8)), ids, 16)
    assert (logits - full_logits).abs().max() <= 1e-4
    assert tokens == full_tokens


def test_outputs_depend_on_neither_chunk_size_nor_q_tile_and_the_quirk_changes_them():
    m = tiny("tiny-llama")
    ids = prompt(m, 200, seed=3)
    runs = [run_steps(m, LongHeads(**dict(SMALL, q_tile=qt)), ids, c)[0] for qt, c in ((64, 1), (3, 24), (16, 199))]
    assert all((r - runs[0]).abs().max() <= 1e-5 for r in runs)
    quirk = LongHeads(**dict(SMALL, prefill_self_exclusion=True))
    assert (run_steps(m, quirk, ids, 24)[0] - runs[0]).abs().max() > 1e-3
    assert quirk.describe()["prefill_self_exclusion"] is True


def test_selection_breaks_ties_by_lower_chunk_index():
    """Equal scores: forced chunks 0 and g-1 first, then the lower chunk index."""
    method = LongHeads(**SMALL)
    method.n_chunks = 3
    st = {"reps": torch.zeros(1, 6, 2)}  # every representation 0: all scores tie
    assert method._select(st, torch.ones(1, 1, 2), torch.tensor([6]))[0, 0].tolist() == [0, 1, 5]


def test_config_and_accounting():
    from infllm_eval.config import compose

    method = make_method(compose(["method=longheads", "model=smollm2"]).method)
    assert (method.params["atten_length"], method.params["begin_selective_length"]) == (6144, 6144)  # preset
    assert make_method(compose(["method=longheads"]).method).params["window_size"] == 256
    assert method.attended_keys(100) == 101
    assert method.attended_keys(10000) == 6144 - 256 + 10001 % 256  # Kc - 1 chunks + the partial one
    mem = method.memory_model(16384, 512, "cpu")
    assert mem["device_tokens"] >= 16384 and mem["host_tokens"] == 0


@pytest.mark.parametrize("bad,match", [
    (dict(window_size=0), "window_size must be a positive integer"),
    (dict(atten_length=36), "atten_length must be a multiple of window_size"),
    (dict(atten_length=16), "atten_length must be a multiple of window_size"),
    (dict(begin_selective_length=4), "begin_selective_length must be at least window_size"),
    (dict(prefill_self_exclusion="yes"), "prefill_self_exclusion must be true or false"),
])
def test_invalid_parameters_rejected(bad, match):
    with pytest.raises(UserError, match=match) as e:
        LongHeads(**dict(SMALL, **bad)).validate()
    assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")  # one sentence
