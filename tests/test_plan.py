"""`plan`: cells, samples, tokens and memory estimates per method, with no weights loaded."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from infllm_eval.config import compose
from infllm_eval.commands.plan import GIB, estimate, model_shape, n_params, plan_cells


def test_parameter_counts_match_the_published_sizes():
    assert n_params(model_shape(compose(["model=mistral"]).model)) / 1e9 == pytest.approx(7.24, abs=0.01)
    assert n_params(model_shape(compose(["model=llama3"]).model)) / 1e9 == pytest.approx(8.03, abs=0.01)
    assert n_params(model_shape(compose(["model=smollm2"]).model)) / 1e6 == pytest.approx(134.5, abs=0.5)


def test_kv_per_method_full_grows_streaming_methods_stay_bounded():
    def est(method, length):
        return estimate(compose(["model=mistral", f"method={method}", "dtype=bfloat16"]), length, "cuda")

    full_32k, full_1m = est("full", 32768), est("full", 1048576)
    # Mistral: 32 layers x 8 kv heads x 128 dims x 2 (k, v) x 2 bytes = 128 KiB per token
    assert full_32k["kv_device"] == pytest.approx((32768 + 32) * 128 * 2**10)
    assert full_1m["kv_device"] > 100 * GIB and full_1m["peak"] > 140 * GIB
    for method in ("streamingllm", "lminfinite", "infllm"):
        small, big = est(method, 32768), est(method, 1048576)
        # infllm's device part grows only by its representative vectors (one [n_heads, head_dim] per unit and
        # layer, kept on the GPU as the reference does): 32 heads x 128 x 2 bytes x 32 layers per 128 tokens
        reprs = 0 if method != "infllm" else (1048576 - 32768) // 128 * 32 * 128 * 2 * 32
        assert big["kv_device"] - small["kv_device"] == reprs and big["peak"] < 40 * GIB, method
    inf = est("infllm", 1048576)
    assert inf["kv_host"] > 100 * GIB  # all memory units offloaded to host memory
    assert est("streamingllm", 32768)["kv_host"] == 0


def test_plan_uses_the_methods_query_tile():
    """One source: `method.params.q_tile` is the tile the method runs with and the one plan's score workspace uses."""
    from infllm_eval.methods import make_method

    def workspace(method, tile):
        cfg = compose(["model=mistral", f"method={method}", "dtype=bfloat16", f"method.params.q_tile={tile}"])
        assert make_method(cfg.method).q_tile == tile
        return estimate(cfg, 32768, "cuda")["workspace"]

    heads, keys = 32, 32768 + 32  # Mistral's query heads; full attention's keys: the prompt + the answer
    assert workspace("full", 64) - workspace("full", 32) == heads * (64 - 32) * keys * 4  # fp32 scores
    window = 128 + 6144  # conf/per_model/mistral_streamingllm.yaml; a tile also sees the tile itself
    assert workspace("streamingllm", 64) - workspace("streamingllm", 32) == heads * (
        64 * (window + 64) - 32 * (window + 32)) * 4


@pytest.fixture
def last_n_method(tmp_path, monkeypatch):
    """A method that is none of the shipped ones, registered here (plan.py knows nothing of it) with its config in
    a plugin folder: the last `n_last` tokens on the device, everything older offloaded to host memory."""
    from infllm_eval.methods import METHODS, ContextMethod

    @METHODS.register("test-last-n")
    class LastN(ContextMethod):
        name = "test-last-n"
        param_names = ("n_last", "base", "distance_scale")

        def memory_model(self, length, chunk, device):
            kept = min(self.params["n_last"], length)
            return {"device_tokens": kept, "host_tokens": length - kept, "workspace_keys": kept}

    (tmp_path / "conf" / "method").mkdir(parents=True)
    (tmp_path / "conf" / "method" / "last-n.yaml").write_text(
        "defaults: [_base, _self_]\nname: last-n\nimpl: test-last-n\ndescription: test\nparams:\n  n_last: 1000\n")
    monkeypatch.setenv("INFLLM_EVAL_PATH", str(tmp_path))
    yield LastN
    METHODS._entries.pop("test-last-n")


def test_plan_asks_the_method_for_its_memory_a_new_method_is_not_full_attention(last_n_method):
    def est(method):
        return estimate(compose(["model=mistral", f"method={method}", "dtype=bfloat16"]), 32768, "cuda")

    per_token = 128 * 2**10  # Mistral: 32 layers x 8 kv heads x 128 dims x (k, v) x 2 bytes
    T = 32768 + 32  # + the passkey answer
    new, full = est("last-n"), est("full")
    assert new["kv_device"] == 1000 * per_token and new["kv_host"] == (T - 1000) * per_token
    assert full["kv_device"] == T * per_token and full["kv_host"] == 0
    assert full["workspace"] - new["workspace"] == 32 * 64 * (T - 1000) * 4  # heads x tile x fewer keys x fp32


def test_a_method_without_a_memory_model_is_named_not_guessed(last_n_method, monkeypatch):
    from infllm_eval.errors import UserError
    from infllm_eval.methods import ContextMethod

    monkeypatch.setattr(last_n_method, "memory_model", ContextMethod.memory_model)
    with pytest.raises(UserError, match="defines no memory_model"):
        estimate(compose(["model=mistral", "method=last-n"]), 4096, "cuda")


def test_plan_sweep_lists_cells_and_flags_what_cannot_fit():
    rows = plan_cells(
        [
            ["model=mistral", f"method={m}", "task.lengths=[4096,1048576]", "device=cuda"]
            for m in ("full", "infllm")
        ],
        budget_gb=80,
        host_budget_gb=256,
    )
    fits = {(r["method"], r["length"]): r["fits"] for r in rows}
    assert fits == {
        ("full", 4096): True,
        ("full", 1048576): False,
        ("infllm", 4096): True,
        ("infllm", 1048576): True,
    }
    assert all(r["samples"] == 5 for r in rows)  # 5 default depths x 1 sample
    assert rows[0]["tokens"] == 5 * (4096 + 32)


def test_cli_plan_multirun_loads_no_weights(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "infllm_eval.cli",
            "plan",
            "-m",
            "model=mistral",
            "method=full,infllm",
            "task.lengths=[1048576]",
            "device=cuda",
            "--budget-gb",
            "80",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)},
    )  # empty hub cache
    assert r.returncode == 0, r.stderr
    assert "| mistral | full | passkey | 1048576 |" in r.stdout and "**NO**" in r.stdout
    assert "2 cells, 10 samples" in r.stdout and "mistral/full/passkey@1048576" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "infllm_eval.cli", "plan", "method=nosuch"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "Did you mean" not in r.stdout and "Available" in r.stderr


def test_shape_comes_from_a_local_config_json_when_there_is_one(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4, '
        '"num_key_value_heads": 1, "vocab_size": 1000, "tie_word_embeddings": true}'
    )
    shape = model_shape(compose(["model=mistral", f"model.path={tmp_path}"]).model)
    assert (shape["num_hidden_layers"], shape["head_dim"], shape["num_key_value_heads"]) == (3, 32, 1)


# -- issue 24: a target device this machine lacks; host memory for offloaded units -------------------------------
def test_a_cuda_target_without_cuda_here_takes_the_budget_given_or_says_it_needs_one(monkeypatch):
    import torch

    from infllm_eval.commands.plan import budget_bytes
    from infllm_eval.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA GPU.*--budget-gb"):
        budget_bytes(None, "cuda")
    assert budget_bytes(80, "cuda") == 80 * GIB
    rows = plan_cells([["model=mistral", "method=full", "task.lengths=[4096]", "device=cuda"]], budget_gb=80)
    assert rows[0]["device"] == "cuda" and rows[0]["dtype"] == "bfloat16" and rows[0]["fits"]
    for bad in (0, -1, float("nan")):
        with pytest.raises(UserError, match="--budget-gb must be a positive number"):
            budget_bytes(bad, "cuda")


def test_offloaded_units_must_fit_host_memory_both_parts_shown():
    from infllm_eval.commands.plan import plan_markdown

    cells = [["model=mistral", "method=infllm", "task.lengths=[32768,1048576]", "device=cuda"]]
    rows = plan_cells(cells, budget_gb=80, host_budget_gb=64)
    by_length = {r["length"]: r for r in rows}
    big = by_length[1048576]
    # ~128 GiB of offloaded units at 1M tokens, plus the process's own memory (plan.runtime_gb)
    assert big["host"] == big["kv_host"] + big["runtime"] and big["kv_host"] > 120 * GIB and big["runtime"] > 0
    assert big["fits_device"] and not big["fits_host"] and not big["fits"]
    assert by_length[32768]["fits"]
    md = plan_markdown(rows)
    assert "| device fits | host fits |" in md and "| yes | **NO** |" in md
    assert "80.00 GiB device, 64.00 GiB host" in md and "mistral/infllm/passkey@1048576 (128.05 GiB host; offload_dir=DIR puts" in md
    assert all(r["fits"] for r in plan_cells(cells, budget_gb=80, host_budget_gb=256))
    # on a CPU target device and host are one memory: everything counts against the host budget too
    cpu = plan_cells([["model=mistral", "method=full", "task.lengths=[32768]", "device=cpu"]], budget_gb=1000,
                     host_budget_gb=16)[0]
    assert cpu["host"] == cpu["peak"] and not cpu["fits_host"] and not cpu["fits"]


def test_cli_plan_for_cuda_without_a_budget_is_one_sentence(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: its GPU is the budget")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    args = [sys.executable, "-m", "infllm_eval.cli", "plan", "model=mistral", "device=cuda"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--budget-gb" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([*args, "--budget-gb", "80", "--host-budget-gb", "-3"], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 2 and "--host-budget-gb must be a positive number" in r.stderr
