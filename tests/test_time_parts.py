"""runners/time_parts.py: its timers nest as it says and are removed afterwards (behaviour, not speed)."""

import importlib.util
from pathlib import Path

from infllm_eval.config import compose
from infllm_eval.methods.infllm import InfLLM
from infllm_eval.methods.memory import UnitStore
from infllm_eval.rope import Rope


def _load():
    path = Path(__file__).resolve().parent.parent / "runners" / "time_parts.py"
    spec = importlib.util.spec_from_file_location("time_parts", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_time_parts_nest_and_leave_the_code_as_it_was():
    tp = _load()
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
