"""Methods on models that mix sliding-window and global layers (issue 27, item 3): `local_layers=native` (the
model's own window on local layers, the method on global ones) or `method` (the method on every layer, each layer
with its own RoPE); what `ls`, `config`, `plan` and the run record say about it."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from method_helpers import conf_params, hf_greedy, prompt, run_steps, tiny

from infllm_eval.engine import Engine
from infllm_eval.errors import UserError
from infllm_eval.layout import GLOBAL, LOCAL, layer_plan, layout
from infllm_eval.methods import METHODS
from infllm_eval.methods.full import FullAttention

FULL = conf_params("full")
TOL = 1e-4


def cli(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "infllm_eval.cli", *args], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "COLUMNS": "400"})
    r.output = r.stdout + r.stderr
    return r


def _unwindowed(model):
    """The same weights with a window longer than any test prompt: every layer attends to all its keys, the local
    layers still with their own RoPE (the dense reference of local_layers=method with full attention)."""
    m = copy.deepcopy(model)
    m.config.sliding_window = 10**6
    return m


def _steps(model, method, ids, chunk, local_layers):
    eng = Engine(model, method, torch.device("cpu"), torch.float32, local_layers=local_layers)
    states = eng.new_states()
    logits = eng.prefill(states, ids, chunk)
    return logits, eng


@pytest.mark.parametrize("arch", ["tiny-gemma3", "tiny-gemma2"])
@pytest.mark.parametrize("chunk", [7, 64])
def test_method_on_every_layer_equals_unwindowed_model(arch, chunk):
    """local_layers=method with full attention == the HF model without a window (Gemma 3: each layer with its own
    RoPE; a second method instance runs the local layers); native == the HF model as it is. The two differ."""
    m = tiny(arch)
    ids = prompt(m, 120)
    every, eng = _steps(m, FullAttention(**FULL), ids, chunk, "method")
    ref, _ = hf_greedy(_unwindowed(m), ids, 0)
    assert (every - ref).abs().max() <= TOL
    native, _ = _steps(m, FullAttention(**FULL), ids, chunk, "native")
    ref_native, _ = hf_greedy(m, ids, 0)
    assert (native - ref_native).abs().max() <= TOL
    assert (every - native).abs().max() > 100 * TOL  # the window matters at 120 tokens (window 16)
    assert all(impl is not None and not isinstance(impl, type(None)) for impl in eng.attn_of)
    assert sorted(i for _, layers in eng.attention_groups() for i in layers) == list(range(len(eng.attn_of)))


def test_method_on_every_layer_binds_each_layers_rope():
    m = tiny("tiny-gemma3")
    eng = Engine(m, FullAttention(**FULL), torch.device("cpu"), torch.float32, local_layers="method")
    assert isinstance(eng.local, FullAttention) and eng.local is not eng.method
    rot, x = m.model.rotary_emb, torch.ones(1, 1, 1, 16)
    for rope, t in ((eng.method.rope, GLOBAL), (eng.local.rope, LOCAL)):
        assert torch.equal(rope.cos_sin(torch.tensor([9]), x)[0], rot(x, torch.tensor([[9]]), t)[0][0])
    assert [layers for _, layers in eng.groups] == [[2], [0, 1]]


def test_streamingllm_on_every_layer_keeps_its_own_window_on_local_layers():
    """A method with its own memory on every layer: equal to full when its window covers the input, different from
    native (the model's window of 16 no longer applies on the local layers)."""
    m = tiny("tiny-gemma3")
    ids = prompt(m, 100)
    method = lambda: METHODS.get("streamingllm")(**{**conf_params("streamingllm"), "n_init": 4, "n_local": 256})
    every, _ = _steps(m, method(), ids, 16, "method")
    full_every, _ = _steps(m, FullAttention(**FULL), ids, 16, "method")
    native, _ = _steps(m, method(), ids, 16, "native")
    assert (every - full_every).abs().max() <= TOL
    assert (every - native).abs().max() > 100 * TOL


def test_local_layers_method_refused_where_it_has_no_effect():
    with pytest.raises(UserError, match="no effect on llama"):
        Engine(tiny("tiny-llama"), FullAttention(**FULL), torch.device("cpu"), torch.float32, local_layers="method")
    with pytest.raises(UserError, match="allowed values: native, method"):
        Engine(tiny("tiny-gemma3"), FullAttention(**FULL), torch.device("cpu"), torch.float32, local_layers="all")


def test_layer_plan_says_where_the_method_runs():
    lay = layout(tiny("tiny-gemma3").config)
    assert layer_plan(lay.layer_types, lay.sliding_window, "native", "infllm") == (
        "infllm on layers 2 (global); the model's own sliding window of 16 tokens on the other 2 (local)")
    assert "on all 3 layers, the 2 local ones included" in layer_plan(lay.layer_types, 16, "method", "infllm")
    assert layer_plan(["full_attention"] * 30, None, "native", "full") == "full on all 30 layers"


# ------------------------------------------------------------------------------------------ CLI: run, ls, config


def test_cli_refuses_bad_local_layers(tmp_path):
    r = cli("run", "model=tiny-gemma3", "local_layers=every", f"output_dir={tmp_path}")
    assert r.returncode == 2 and "local_layers must be native or method" in r.output and "Traceback" not in r.output
    r = cli("run", "model=tiny-llama", "local_layers=method", "task.lengths=[64]", "task.depths=[0.5]",
            f"output_dir={tmp_path}")
    assert r.returncode == 2 and "has no effect on tiny-llama" in r.output
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_run_records_the_layer_plan_and_keys_cells_apart(tmp_path):
    common = ["model=tiny-gemma3", "method=streamingllm", "task.lengths=[96]", "task.depths=[0.5]",
              f"output_dir={tmp_path}", "progress=false"]
    assert cli("run", *common, "run_name=native").returncode == 0
    assert cli("run", *common, "run_name=every", "local_layers=method").returncode == 0
    prov = json.loads((tmp_path / "native" / "provenance.json").read_text())
    assert prov["layers"].startswith("streamingllm on layers 2 (global); the model's own sliding window of 16")
    assert "local_layers: native" in (tmp_path / "native" / "config.yaml").read_text()
    keys = [json.loads((tmp_path / d / "samples.jsonl").read_text().splitlines()[0])["key"] for d in ("native", "every")]
    assert keys[0] != keys[1]  # a cell with the other setting never reuses these samples


def test_ls_and_config_say_what_a_method_does_on_mixed_layouts():
    r = cli("ls", "models")
    assert r.returncode == 0
    rows = {ln.split()[1]: ln for ln in r.stdout.splitlines() if ln.startswith("│ ")}
    assert "methods run on its 3 global layers, its 15 local ones keep their window of 512" in rows["gemma3"]
    assert "methods run on its 1 global layer, its 2 local" in rows["tiny-gemma3"] and "global" not in rows["smollm2"]
    r = cli("config", "model=tiny-gemma3", "method=infllm")
    assert r.returncode == 0
    assert r.output.rstrip().splitlines()[-1] == (
        "# layers: infllm on layers 2 (global); the model's own sliding window of 16 tokens on the other 2 (local)")
    r = cli("config", "model=smollm2")
    assert "# layers" not in r.output


# ---------------------------------------------------------------------------------------------------- plan


def test_plan_counts_the_method_on_global_layers_and_the_window_on_local_ones():
    from infllm_eval.commands.plan import estimate, model_shape
    from infllm_eval.config import compose

    L, C = 32768, 8192
    T = L + 1  # the prompt and the one generated token
    cfg = compose(["model=gemma3", "method=full", f"chunk_size={C}", "task.max_new_tokens=1"])
    s = model_shape(cfg.model)
    assert s["layer_types"].count(GLOBAL) == 3 and s["layer_types"][5] == GLOBAL and s["sliding_window"] == 512
    kv = 2 * 1 * 256 * 4
    got = estimate(cfg, L, "cpu")["kv_device"]
    assert got == (3 * T + 15 * (512 + 2 * C + 64)) * kv
    every = estimate(compose(["model=gemma3", "method=full", f"chunk_size={C}", "task.max_new_tokens=1",
                              "local_layers=method"]), L, "cpu")["kv_device"]
    assert every == 18 * T * kv
