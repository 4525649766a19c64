"""probes/: the InfLLM lookup probes read the observation hook (nothing patched) and refuse other methods."""

import pytest

from infllm_eval.errors import UserError
from infllm_eval.methods.infllm import InfLLM
from probes import needle_ranks
from probes.common import passkey_sample

TINY = ["model=tiny-llama", "chunk_size=128", "method.params.n_local=128", "method.params.exc_block_size=64",
        "method.params.block_size=32", "method.params.topk=2", "method.params.max_cached_block=4",
        "method.params.n_init=16"]


@pytest.mark.parametrize("probe", ["probes/needle_ranks.py", "probes/repr_ranks.py"])
def test_lookup_probes_refuse_other_methods(probe):
    with pytest.raises(UserError, match=f"{probe} measures InfLLM's unit lookup.*not method=streamingllm"):
        passkey_sample(["1024", "0.5", "model=tiny-llama", "method=streamingllm"], probe)


def test_needle_ranks_reads_every_layer_through_the_hook_and_patches_nothing():
    before = dict(vars(InfLLM))
    facts, log, g = needle_ranks.needle_ranks(["1024", "0.5", "0", *TINY])
    assert dict(vars(InfLLM)) == before
    assert facts["topk"] == 2 and facts["n_layers"] == 2 and facts["units"]
    n_lookups = 1 + len(g.tokens) - 1  # the last prompt token, then every generated token but the last
    assert [layer for layer, _, _ in log] == [0, 1] * n_lookups
    for _, summed, best_head in log:
        assert set(summed) == set(best_head) == set(facts["units"])
        assert all(0 <= r < 1024 // 32 for r in [*summed.values(), *best_head.values()])
