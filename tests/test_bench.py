"""`infllm-eval bench`: the accounting it relies on, and one real run on a tiny model (behaviour, not speed)."""

import json

import pandas as pd
import pytest
import torch

from infllm_eval.commands.bench import linear_flops_per_token, run_bench, useful_flops
from infllm_eval.config import compose
from infllm_eval.engine import Engine
from infllm_eval.errors import UserError
from infllm_eval.methods import make_method
from infllm_eval.models import load_model


def _method(name, *extra):
    return make_method(compose(["model=tiny-llama", f"method={name}", *extra]).method)


def _bound(method, model):
    Engine(model, method, torch.device("cpu"), torch.float32)
    return method


@pytest.fixture(scope="module")
def tiny():
    return load_model(compose(["model=tiny-llama"]).model, device="cpu", dtype="float32")


def test_attended_keys_full_grows_window_and_infllm_stay_flat(tiny):
    full = _bound(_method("full"), tiny.model)
    assert [full.attended_keys(p) for p in (0, 9, 99_999)] == [1, 10, 100_000]
    win = _bound(_method("streamingllm"), tiny.model)
    cap = win.n_local + win.n_init
    assert win.attended_keys(10**6) == cap and win.attended_keys(10**7) == cap
    assert win.attended_keys(5) == 6  # inside the window: every earlier token
    inf = _bound(_method("infllm"), tiny.model)
    far = inf.attended_keys(10**6)
    assert far == inf.attended_keys(10**7)  # flat per-token cost, the method's promise
    assert far >= inf.n_local + inf.n_init + inf.topk * inf.block_size


def test_linear_flops_count_every_projection_and_mlp_weight(tiny):
    m = tiny.model
    expected = 0
    for layer in m.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            expected += 2 * lin.weight.numel()
    assert linear_flops_per_token(m) == expected
    eng = Engine(m, _method("full"), torch.device("cpu"), torch.float32)
    s = eng.spec
    attn = 4 * s.n_heads * s.head_dim * s.n_layers * sum(range(1, 11))
    assert useful_flops(eng, 0, 10, with_lm_head=0) == expected * 10 + attn


def test_kv_bytes_count_stored_tokens_not_buffer_capacity(tiny):
    """Full attention stores every token's K and V; the window methods only n_init + the last n_local tokens
    (the buffers themselves are allocated larger: that is workspace, not K/V)."""
    s = Engine(tiny.model, _method("full"), torch.device("cpu"), torch.float32).spec
    per_token = 2 * s.n_layers * s.n_kv_heads * s.head_dim * 4  # fp32
    n = 300
    ids = torch.randint(0, tiny.model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(0))
    for name, extra, kept in [("full", [], n), ("streamingllm", ["method.params.n_local=64", "method.params.n_init=8"],
                                                 8 + 64)]:
        method = _method(name, *extra)
        eng = Engine(tiny.model, method, torch.device("cpu"), torch.float32)
        states = eng.new_states()
        eng.prefill(states, ids, 128)
        # the window keeps one token more than n_local - 1 between calls at most; init tokens are counted once
        got = method.kv_bytes(states)
        assert got["offloaded"] == 0
        assert abs(got["device"] - kept * per_token) <= per_token, (name, got["device"] / per_token, kept)


def test_infllm_offloaded_units_are_counted_as_offloaded(tiny):
    method = _method("infllm", "method.params.n_local=64", "method.params.n_init=8", "method.params.topk=2",
                     "method.params.block_size=16", "method.params.repr_topk=2", "method.params.exc_block_size=32",
                     "method.params.max_cached_block=4", "method.params.offload=true")
    eng = Engine(tiny.model, method, torch.device("cpu"), torch.float32)
    states = eng.new_states()
    eng.prefill(states, torch.randint(0, tiny.model.config.vocab_size, (400,)), 128)
    kv = method.kv_bytes(states)
    assert kv["offloaded"] > 0 and kv["device"] > 0
    assert kv["offloaded"] == method.memory_stats(states)["unit_bytes"] > 0


def test_bench_runs_methods_side_by_side_and_writes_its_files(tmp_path):
    df, out = run_bench(["model=tiny-llama", "bench.methods=[full,infllm]", "bench.lengths=[192]",
                         "bench.decode_tokens=2", "bench.warmup_tokens=32", "bench.peak_matmul_size=256",
                         "chunk_size=64", "bench.prompt_build_length=4096", f"bench.output_dir={tmp_path}"])
    assert list(df["method"]) == ["full", "infllm", "peer"] and set(df["status"]) == {"ok"}
    build = pd.read_csv(out / "prompt_build.csv").iloc[0]
    assert build["n_tokens"] == 4096 and build["build_s"] > 0 and "4,096 tokens" in (out / "bench.md").read_text()
    assert (df["prefill_tok_s"] > 0).all() and (df["decode_ms_per_token"] > 0).all()
    assert (df["kv_device_mb"] > 0).all() and (df["mfu"] > 0).all()
    saved = pd.read_csv(out / "bench.csv")
    assert len(saved) == 3 and {"peak_matmul_gflop_s", "useful_gflop_s", "workspace_mb"} <= set(saved.columns)
    assert list(saved["attention_backend"]) == ["cpu-flash", "cpu-flash", "transformers sdpa"]
    # the peer stores what full attention stores (every token's K/V) and does full attention's work
    by = saved.set_index("method")
    assert by.loc["peer", "kv_device_mb"] == by.loc["full", "kv_device_mb"] > 0
    assert by.loc["peer", "useful_gflop"] == by.loc["full", "useful_gflop"]
    peak = saved["peak_matmul_gflop_s"]  # one denominator: the best of the run's matmul measurements
    assert peak.nunique() == 1 and (peak >= saved["cell_peak_gflop_s"]).all()
    assert ((saved["mfu"] - saved["useful_gflop_s"] / peak).abs() < 1e-4).all()
    # against the cell's own measurements (taken around its prefill): a smaller denominator, so never below mfu
    assert ((saved["cell_mfu"] - saved["useful_gflop_s"] / saved["cell_peak_gflop_s"]).abs() < 1e-4).all()
    assert (saved["cell_mfu"] >= saved["mfu"] - 1e-9).all()
    # the last chunk alone: positions 128..190 (prompt[:-1] in chunks of 64), timed within the prefill
    assert (saved["last_chunk_tokens"] == 63).all()
    assert (saved["last_chunk_tok_s"] > 0).all() and (saved["last_chunk_mfu"] > 0).all()
    assert ((saved["last_chunk_mfu"] - saved["last_chunk_useful_gflop_s"] / peak).abs() < 1e-4).all()
    assert (63 / saved["last_chunk_tok_s"] < saved["prefill_s"]).all()
    assert (out / "bench_throughput.png").stat().st_size > 0 and (out / "bench_memory.png").is_file()
    prov = json.loads((out / "provenance.json").read_text())  # which code produced the figures
    commit = prov["git"]["commit"]  # None only outside a git checkout
    assert (commit is None or len(commit) == 40) and prov["device_name"] == saved["device"].iloc[0]
    assert prov["versions"]["torch"] == torch.__version__


def test_bench_skips_a_length_whose_kv_the_method_says_cannot_fit(monkeypatch):
    """The fit decision asks the method (`memory_model`), whatever its name: a window method that claimed to keep
    a trillion tokens is skipped; full attention is skipped at a memory share too small for its K/V."""
    from infllm_eval.commands.bench import _cell
    from infllm_eval.methods.streamingllm import StreamingLLM

    class Rows(list):
        put = list.append

    common = ["model=tiny-llama", "bench.warmup_tokens=16", "bench.peak_matmul_size=64", "bench.decode_tokens=1",
              "chunk_size=64"]
    rows = Rows()
    _cell(common, "streamingllm", 96, rows)
    assert rows.pop()["status"] == "ok"
    monkeypatch.setattr(StreamingLLM, "memory_model",
                        lambda self, length, chunk, device: {"device_tokens": 10**12, "host_tokens": 0,
                                                             "workspace_keys": 1})
    _cell(common, "streamingllm", 96, rows)
    assert rows.pop()["status"].startswith("skipped: K/V needs ~")
    _cell([*common, "bench.memory_fraction=1e-9"], "full", 96, rows)
    assert rows.pop()["status"].startswith("skipped: K/V needs ~")


def test_bench_rejects_bad_settings_before_loading_anything(tmp_path):
    with pytest.raises(UserError, match="bench.decode_tokens"):
        run_bench(["model=tiny-llama", "bench.decode_tokens=-1", f"bench.output_dir={tmp_path}"])
    with pytest.raises(UserError, match="bench.lengths"):
        run_bench(["model=tiny-llama", "bench.lengths=[]", f"bench.output_dir={tmp_path}"])
    with pytest.raises(UserError, match="bench.repeats"):
        run_bench(["model=tiny-llama", "bench.repeats=0", f"bench.output_dir={tmp_path}"])


def test_bench_repeats_give_one_row_each_and_a_median_summary(tmp_path):
    df, out = run_bench(["model=tiny-llama", "bench.methods=[streamingllm]", "bench.lengths=[96,128]",
                         "bench.repeats=3", "bench.decode_tokens=1", "bench.warmup_tokens=16",
                         "bench.peak_matmul_size=128", "chunk_size=64", "bench.prompt_build_length=0",
                         "bench.peer=false", f"bench.output_dir={tmp_path}"])
    # repeat by repeat, each a full sweep over the lengths (drift hits both lengths alike)
    assert list(zip(df["repeat"], df["length"])) == [(0, 96), (0, 128), (1, 96), (1, 128), (2, 96), (2, 128)]
    assert set(df["status"]) == {"ok"}
    summary = pd.read_csv(out / "bench_summary.csv")
    assert list(summary["length"]) == [96, 128]
    s = summary.iloc[1]
    assert s["n"] == 3 and s["prefill_tok_s"] == df[df["length"] == 128]["prefill_tok_s"].median()
    assert s["prefill_tok_s_min"] <= s["prefill_tok_s"] <= s["prefill_tok_s_max"]
    assert "Median, min and max over the repeats" in (out / "bench.md").read_text()


def test_bench_takes_method_params_overrides_for_the_methods_it_benches(tmp_path):
    """`method.params.*` overrides apply to the benched method (not to the config's default method, which may
    not have the key); a method in bench.methods that lacks the key, or a bad value, is refused in one sentence."""
    common = ["model=tiny-llama", "bench.lengths=[96]", "bench.decode_tokens=1", "bench.warmup_tokens=16",
              "bench.peak_matmul_size=64", "chunk_size=64", "bench.prompt_build_length=0",
              f"bench.output_dir={tmp_path}"]
    df, out = run_bench([*common, "bench.methods=[infllm]", "method.params.topk=3"])
    assert list(df["status"]) == ["ok", "ok"] and list(df["method"]) == ["infllm", "peer"]  # the peer: no override
    saved = compose(["method=infllm"])  # the default is not 3, so the written config shows the override
    assert saved.method.params.topk != 3 and "topk: 3" in (out / "config.yaml").read_text()
    with pytest.raises(UserError, match="bench.methods includes 'full'"):
        run_bench([*common, "bench.methods=[full,infllm]", "method.params.topk=3"])
    with pytest.raises(UserError, match="topk must be a positive integer"):
        run_bench([*common, "bench.methods=[infllm]", "method.params.topk=0"])


def test_bench_refuses_method_equals_which_it_would_ignore(tmp_path):
    """`bench method=X` used to bench bench.methods' default list and ignore X: a silent no-op."""
    from infllm_eval.errors import UserError

    for bad in ("method=streamingllm", "method=nosuch"):
        with pytest.raises(UserError, match=r"bench.methods=\["):
            run_bench(["model=tiny-llama", bad, f"bench.output_dir={tmp_path}"])
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gemma3"])
def test_the_peer_is_the_transformers_forward_and_agrees_with_full_attention(arch):
    """The peer row's runner prefills in chunks through the transformers model itself (its SDPA attention and
    DynamicCache): its logits after the prompt and while decoding equal the engine's full attention's."""
    from method_helpers import conf_params, prompt
    from method_helpers import tiny as tiny_model

    from infllm_eval.commands.bench import Peer
    from infllm_eval.methods.full import FullAttention

    m = tiny_model(arch)
    ids = prompt(m, 150, seed=2)
    peer = Peer(m, FullAttention(**conf_params("full")), torch.device("cpu"), torch.float32)
    eng = Engine(m, FullAttention(**conf_params("full")), torch.device("cpu"), torch.float32)
    ps, es = peer.new_states(), eng.new_states()
    a, b = peer.prefill(ps, ids, 64), eng.prefill(es, ids, 64)
    assert (a - b).abs().max() <= 1e-4 and a.std() > 0.5
    for i in range(3):
        t = torch.tensor([[int(a.argmax())]])
        a, b = peer.forward(ps, t, 150 + i, logits=True), eng.forward(es, t, 150 + i, logits=True)
        assert (a - b).abs().max() <= 1e-4
    assert ps[0].get_seq_length() == 153
    if arch == "tiny-llama":  # (Gemma 3's local layers: transformers keeps its own sliding-window cache)
        assert peer.kv_bytes(ps)["device"] == eng.method.kv_bytes(es)["device"] > 0
