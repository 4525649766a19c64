"""Composing a config: what was asked for is recorded (invocation), and recording it never touches result keys."""

from __future__ import annotations

import pytest

from infllm_eval.config import compose, invocation, validate
from infllm_eval.errors import UserError


def test_invocation_records_preset_per_model_file_and_overrides():
    cfg = compose(["model=mistral", "method=infllm", "preset=mistral-infbench", "run_name=x/${seed}"])
    assert cfg.invocation.preset == "mistral-infbench" and cfg.invocation.per_model == "mistral_infllm"
    assert cfg.method.params.topk == 96 and cfg.method.params.base == 1000000  # both were applied
    assert list(cfg.invocation.overrides)[-1] == "run_name=x/${seed}"  # recorded as typed, not interpolated
    # an optional per-model file that does not exist (most model x method pairs) is recorded as none
    plain = compose(["model=tiny-llama", "method=infllm"]).invocation
    assert plain.preset is None and plain.per_model is None
    assert compose(["model=mistral", "method=infllm", "~per_model"]).invocation.per_model is None


def test_invocation_is_not_a_setting_and_not_in_the_method_task_or_model():
    cfg = compose(["model=tiny-llama"])
    assert "invocation" not in cfg.method and "invocation" not in cfg.model and "invocation" not in cfg.task
    with pytest.raises(UserError, match="Unknown key 'invocation'"):
        compose(["invocation.preset=mistral-infbench"])
    assert invocation({"preset": None, "per_model": "nosuch_pair"}, [])["per_model"] is None


@pytest.mark.parametrize("overrides,needle", [
    (["run_name=/tmp/x"], "run_name"),
    (["run_name=a/../../b"], "run_name"),
    (["bench.lengths=[4096,0]"], "bench.lengths"),
    (["bench.repeats=0"], "bench.repeats"),
    (["bench.peak_matmul_size=0"], "bench.peak_matmul_size"),
    (["bench.memory_fraction=0"], "bench.memory_fraction"),
    (["bench.methods=[]"], "bench.methods"),
    (["dtype=half8"], "dtype"),
    (["device=cuda:x"], "device"),
])
def test_values_are_validated_when_composing(overrides, needle):
    with pytest.raises(UserError, match=needle):
        compose(overrides)


def test_edge_values_that_are_fine():
    cfg = compose(["run_name=sweeps/a/b", "bench.memory_fraction=1", "device=cuda:1", "dtype=bf16"])
    validate(cfg)  # a config for another machine: `run` checks the device, `config` and `plan` do not


@pytest.mark.parametrize("overrides,chunk", [(["model=qwen2", "method=infllm"], 2048),
                                             (["model=vicuna", "method=full"], 4096),
                                             (["method=sirllm"], 512),
                                             (["method=sirllm", "chunk_size=256"], 256),
                                             (["method=infllm"], 8192)])
def test_per_model_top_level_keys_take_effect_and_the_command_line_wins(overrides, chunk):
    """A per-model file's chunk_size (the reference's qwen2 / vicuna values, sirllm's preset) once lost to the root
    config's default, as the root's `_self_` came after it in the defaults list."""
    assert compose(overrides).chunk_size == chunk
