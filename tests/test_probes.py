"""probes/: the lookup probes read InfLLM's observation hook or wrap a method's selection for one run (nothing stays
patched), and refuse other methods."""

import pytest

from infllm_eval.errors import UserError
from infllm_eval.methods.infllm import InfLLM
from infllm_eval.methods.infllmv2 import InfLLMv2
from infllm_eval.methods.longheads import LongHeads
from probes import infllmv2_blocks, longheads_chunks, needle_ranks
from probes.common import passkey_sample

TINY = ["model=tiny-llama", "chunk_size=128", "method.params.n_local=128", "method.params.exc_block_size=64",
        "method.params.block_size=32", "method.params.topk=2", "method.params.max_cached_block=4",
        "method.params.n_init=16"]


@pytest.mark.parametrize("probe", ["probes/needle_ranks.py", "probes/repr_ranks.py"])
def test_lookup_probes_refuse_other_methods(probe):
    with pytest.raises(UserError, match=f"{probe} measures the lookup of infllm.*not method=streamingllm"):
        passkey_sample(["1024", "0.5", "model=tiny-llama", "method=streamingllm"], probe)


@pytest.mark.parametrize("probe,cls,name", [(longheads_chunks, LongHeads, "longheads"),
                                            (infllmv2_blocks, InfLLMv2, "infllmv2")])
def test_selection_probes_log_every_layer_and_restore_the_method(probe, cls, name):
    fn = getattr(probe, probe.__name__.split(".")[-1])
    with pytest.raises(UserError, match=f"measures the lookup of {name}.*not method=infllm"):
        fn(["1024", "0.5", "model=tiny-llama", "method=infllm"])
    small = {"longheads": ["method.params.window_size=32", "method.params.atten_length=256",
                           "method.params.begin_selective_length=256"],
             "infllmv2": ["method.params.dense_len=256", "method.params.topk=4", "method.params.window_size=128",
                          "method.params.block_size=32"]}[name]
    before = dict(vars(cls))
    facts, log = fn(["1024", "0.5", "0", "model=tiny-llama", "chunk_size=128", *small])
    assert dict(vars(cls)) == before
    n_lookups = len(log) // facts["n_layers"]
    assert n_lookups >= 2 and [row[0] for row in log] == [0, 1] * n_lookups  # last prompt token, generated ones
    assert all(0 <= row[1] <= row[-1] for row in log)  # groups / heads that chose a needle chunk, of all


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


def test_sirllm_kept_follows_positions_through_evictions_and_restores_the_method():
    from infllm_eval.methods.sirllm import SirLLM
    from probes import sirllm_kept

    before = dict(vars(SirLLM))
    facts, rows = sirllm_kept.sirllm_kept(["1024", "0.5", "0", "model=tiny-llama", "chunk_size=64",
                                           "method.params.token_entropy_size=252"])
    assert dict(vars(SirLLM)) == before
    assert facts["cached"] <= 256 and len(rows) == facts["n"]
    assert {r[0] for r in rows} == set(range(facts["at"], facts["at"] + facts["n"]))
    assert all((r[3] is None) == (not r[2]) for r in rows)  # an entropy exactly for the kept ones


def test_unit_dtype_diff_compares_every_position_and_sees_the_rounding(capsys):
    from probes import unit_dtype_diff

    unit_dtype_diff.main(["1024", "0.5", *TINY])
    out = capsys.readouterr().out.splitlines()
    assert "units in the compute dtype (torch.float32)" in out[0]
    bf16 = next(x for x in out if "units in bfloat16" in x)
    diff = float(bf16.split("max |dlogit| ")[1].split()[0])
    assert 0 < diff < 0.05  # units really rounded (many units at this length), and only by rounding
    assert any("units in float16" in x for x in out)


def test_plan_vs_peak_puts_the_estimate_beside_each_sample(tmp_path, capsys):
    from infllm_eval import runner
    from infllm_eval.config import compose
    from probes import plan_vs_peak

    runner.run_cell(compose(["model=tiny-llama", "method=infllm", "task.lengths=[512]", "task.depths=[0.5]",
                             "progress=false", f"output_dir={tmp_path}", *TINY[2:]]))
    run_dir = tmp_path / "tiny-llama/infllm/passkey"
    rows = plan_vs_peak.rows(run_dir)
    assert len(rows) == 1 and rows[0]["length"] == 512
    assert rows[0]["peak_gib"] > 0 and rows[0]["plan_gib"] > 0 and rows[0]["storage"] == "float32 memory"
    plan_vs_peak.main([str(run_dir)])
    assert "| infllm | 512 | 0.5 |" in capsys.readouterr().out


def test_full_vs_peer_times_three_runners_and_puts_the_kernel_back(capsys):
    from infllm_eval.methods import kernels
    from probes import full_vs_peer

    before = kernels._causal_flash
    full_vs_peer.main(["300", "64", "1", "model=tiny-llama"])
    lines = capsys.readouterr().out.splitlines()
    assert [x.split()[0] for x in lines] == ["peer", "full", "full-tiled"] and all("tok/s" in x for x in lines)
    assert kernels._causal_flash is before
