"""Issue 28 item 5, `prefix_reuse`: samples whose prompts start alike prefill the common start once; a sample that
resumes from another's states gives exactly the outputs of its own fresh run (every decoded position's logits,
bit for bit), for every kind of state (InfLLM's growing units, full attention's buffer, windows, deep copies)."""

from __future__ import annotations

import json

import pytest
import torch
from method_helpers import conf_params, prompt, tiny

from infllm_eval import runner
from infllm_eval.config import compose
from infllm_eval.engine import Engine
from infllm_eval.methods.full import FullAttention
from infllm_eval.methods.infllm import InfLLM
from infllm_eval.methods.sirllm import SirLLM
from infllm_eval.methods.snapkv import SnapKV
from infllm_eval.methods.streamingllm import StreamingLLM

INFLLM = dict(conf_params("infllm"), n_local=64, n_init=8, topk=3, block_size=16, repr_topk=2, exc_block_size=32,
              max_cached_block=4, offload=False)
METHODS = {
    "full": lambda: FullAttention(**conf_params("full")),
    "infllm": lambda: InfLLM(**INFLLM),
    "infllm-offload": lambda: InfLLM(**dict(INFLLM, offload=True)),
    "streamingllm": lambda: StreamingLLM(**dict(conf_params("streamingllm"), n_init=8, n_local=64)),
    "snapkv": lambda: SnapKV(**dict(conf_params("snapkv"), compression_ratio=0.5, window_size=8)),  # deep copies
    "sirllm": lambda: SirLLM(**dict(conf_params("sirllm"), start_size=4, token_entropy_size=40)),  # token nll
}
CHUNK = 32


def _variants(base: torch.Tensor, n: int, cuts: list[int], seed: int = 9) -> list[torch.Tensor]:
    """Prompts equal to `base` up to each cut, different after it."""
    out = []
    for i, c in enumerate(cuts):
        tail = torch.randint(3, 500, (n - c,), generator=torch.Generator().manual_seed(seed + i))
        out.append(torch.cat([base[:c], tail]))
    return out


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("name", list(METHODS))
def test_resumed_samples_equal_their_fresh_runs(arch, name, tmp_path):
    m = tiny(arch)
    trunk = prompt(m, 400, seed=1)
    # two samples parting from the trunk at 301 and 170 tokens: resumed at the chunk boundaries 288 and 160,
    # longest first (the second restore rewinds what the first wrote)
    b, c = _variants(trunk, 380, [301, 170])
    fresh = {}
    for key, ids in (("b", b), ("c", c)):
        eng = Engine(m, METHODS[name](), torch.device("cpu"), torch.float32)
        fresh[key] = _steps(eng, ids)
    eng = Engine(m, METHODS[name](), torch.device("cpu"), torch.float32,
                 offload_dir=str(tmp_path) if name == "infllm" else None)
    snaps = {}
    eng.generate(trunk, 6, CHUNK, stop_ids=[], snapshot_at=(160, 288), snapshots=snaps)
    assert sorted(snaps) == [160, 288]
    for key, ids, at in (("b", b, 288), ("c", c, 160), ("c", c, 160)):  # a snapshot restores more than once
        got = _steps(eng, ids, resume=(at, snaps[at]))
        assert torch.equal(got[0], fresh[key][0]), (name, key)
        assert got[1] == fresh[key][1]


@torch.no_grad()
def _steps(eng: Engine, ids: torch.Tensor, resume=None) -> tuple[torch.Tensor, list[int]]:
    """Logits after the prompt and after each greedy token fed back [6, V], and the tokens."""
    if resume is None:
        states, start = eng.new_states(), 0
        eng._nll_carry = None
    else:
        states, start = eng.restore(resume[1]), resume[0]
    logits = [eng.prefill(states, ids, CHUNK, start=start)]
    tokens = []
    for i in range(5):
        tokens.append(int(logits[-1].argmax()))
        logits.append(eng.forward(states, torch.tensor([[tokens[-1]]]), ids.numel() + i, logits=True))
    return torch.stack(logits), tokens


def test_prefill_refuses_a_start_off_the_chunk_grid():
    m = tiny("tiny-llama")
    eng = Engine(m, FullAttention(**conf_params("full")), torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="not a chunk boundary"):
        eng.prefill(eng.new_states(), prompt(m, 100), CHUNK, start=40)


GRID = ["model=tiny-llama", "method=infllm", "task.lengths=[600,900]", "task.depths=[0.2,0.5,0.8]",
        "task.samples=1", "progress=false", "chunk_size=64", "method.params.n_local=64", "method.params.n_init=8",
        "method.params.block_size=16", "method.params.exc_block_size=32", "method.params.topk=2",
        "method.params.max_cached_block=4"]


def _records(out) -> dict[str, dict]:
    path = out / "tiny-llama/infllm/passkey/samples.jsonl"
    return {r["sample_id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_a_passkey_grid_with_prefix_reuse_records_what_it_records_without(tmp_path):
    runner.run_cell(compose([*GRID, f"output_dir={tmp_path / 'plain'}"]))
    runner.run_cell(compose([*GRID, f"output_dir={tmp_path / 'reuse'}", "prefix_reuse=true"]))
    plain, reuse = _records(tmp_path / "plain"), _records(tmp_path / "reuse")
    assert plain.keys() == reuse.keys() and len(plain) == 6
    for sid in plain:
        for field in ("prediction", "score", "key", "n_input_tokens", "status", "answers"):
            assert plain[sid][field] == reuse[sid][field], (sid, field)
    reused = {sid: r["prefix_reused_tokens"] for sid, r in reuse.items()}
    # one trunk; every other sample parts from it after some chunks of the shared head and haystack
    assert sorted(reused.values()).count(0) == 1 and all(v % 64 == 0 for v in reused.values())
    assert sum(v > 0 for v in reused.values()) == 5
    assert "prefix_reused_tokens" not in next(iter(plain.values()))
    summary = (tmp_path / "reuse/tiny-llama/infllm/passkey/summary.csv").read_text()
    assert summary.splitlines()[0] == (tmp_path / "plain/tiny-llama/infllm/passkey/summary.csv").read_text() \
        .splitlines()[0]
