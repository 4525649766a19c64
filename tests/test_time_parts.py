"""probes/time_parts.py: its timers nest as it says and are removed afterwards (behaviour, not speed)."""

import pytest

from infllm_eval.config import compose
from infllm_eval.methods.infllm import InfLLM
from infllm_eval.methods.memory import UnitStore
from infllm_eval.rope import Rope
from probes import time_parts as tp


def test_time_parts_nest_and_leave_the_code_as_it_was():
    before = (InfLLM.attend, InfLLM._plan_topk, UnitStore.gather, UnitStore.add, vars(Rope)["apply"])
    cfg = compose(["method=infllm", "model=tiny-llama", "chunk_size=128", "bench.warmup_tokens=64",
                   "method.params.n_local=128", "method.params.exc_block_size=64", "method.params.block_size=32",
                   "method.params.topk=2", "method.params.max_cached_block=4", "method.params.n_init=16"])
    total, parts = tp.measure(cfg, 640)
    att, joint, fused = (parts[k][1] for k in tp.ORDER[:3])
    assert 0 < fused <= joint <= att <= total
    assert parts[tp.ORDER[0]][0] == 2 * 5  # tiny-llama's 2 layers x 5 chunks of 128
    assert parts[tp.ORDER[1]][0] == 2 * 640 // 64  # one joint softmax per execution block and layer
    assert parts["  unit writes (UnitStore.add)"][0] > 0 and parts["  unit gather"][0] > 0
    after = (InfLLM.attend, InfLLM._plan_topk, UnitStore.gather, UnitStore.add, vars(Rope)["apply"])
    assert after == before


def test_timers_are_removed_after_an_error():
    import infllm_eval.methods.infllm as infllm_mod

    before = (InfLLM.attend, InfLLM._plan_topk, infllm_mod.multi_stage_attention, vars(Rope)["apply"])
    with pytest.raises(RuntimeError), tp.timers(InfLLM()):
        assert InfLLM.attend is not before[0]  # patched inside
        raise RuntimeError("a prefill that fails")
    assert (InfLLM.attend, InfLLM._plan_topk, infllm_mod.multi_stage_attention, vars(Rope)["apply"]) == before
    assert "attend" in vars(InfLLM) and "_plan_topk" in vars(InfLLM)
