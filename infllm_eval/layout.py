"""What a decoder layer of each supported family looks like, read from the transformers config.

The engine runs one layer loop for every family; `Layout` tells it, per model, which projections are fused, where the
norms sit and which RMSNorm flavour they are, the MLP activation, the embedding scale, the softmax scale and logit
soft-capping, and per layer the attention type (global, or a sliding window of W tokens) and the RoPE the layer
uses. The structural traits of a family (which modules exist) come from `FAMILIES`, keyed by `model_type`; every
number comes from the config (`layout(config)`), none is guessed.

Family traits (transformers 5.x modeling files):
- llama / mistral / qwen2 (Qwen2.5 too): input_layernorm -> q/k/v_proj -> o_proj -> residual ->
  post_attention_layernorm -> gate/up/down -> residual; RMSNorm weight * x.
- qwen3: the same plus per-head q_norm / k_norm (RMSNorm over head_dim) before RoPE.
- phi3 (Phi-3, Phi-3.5): fused qkv_proj ([q | k | v]) and gate_up_proj ([gate | up]).
- gemma2: the "sandwich": input_layernorm -> attention -> post_attention_layernorm -> residual ->
  pre_feedforward_layernorm -> MLP -> post_feedforward_layernorm -> residual; RMSNorm (1 + weight) in fp32;
  embeddings times sqrt(hidden) (in the embedding dtype); softmax scale query_pre_attn_scalar ** -0.5; attention
  and final logit soft-capping; alternating sliding / full layers (`layer_types`).
- gemma3_text: Gemma 2's layer plus Gemma-flavoured q_norm / k_norm; local and global layers with their own RoPE
  (`rope_parameters[layer_type]`: the local base, and the global base with its scaling).
"""

from __future__ import annotations

from dataclasses import dataclass

from infllm_eval.errors import UserError

GLOBAL, LOCAL = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class Family:
    fused_qkv: bool = False  # qkv_proj instead of q_proj / k_proj / v_proj
    fused_gate_up: bool = False  # gate_up_proj instead of gate_proj / up_proj
    qk_norm: bool = False  # per-head self_attn.q_norm / k_norm before RoPE
    sandwich: bool = False  # Gemma: post_attention_layernorm on the attention output, pre/post_feedforward_layernorm
    gemma_norm: bool = False  # RMSNorm computes x * (1 + weight) in fp32 (else weight * x)
    embed_scaled: bool = False  # embeddings times sqrt(hidden_size), in the embedding dtype
    per_type_rope: bool = False  # rope_parameters keyed by layer type (the rotary module takes `layer_type`)


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(),
    "qwen3": Family(qk_norm=True),
    "phi3": Family(fused_qkv=True, fused_gate_up=True),
    "gemma2": Family(sandwich=True, gemma_norm=True, embed_scaled=True),
    "gemma3_text": Family(qk_norm=True, sandwich=True, gemma_norm=True, embed_scaled=True, per_type_rope=True),
}


@dataclass(frozen=True)
class Layout:
    model_type: str
    family: Family
    activation: str  # transformers ACT2FN name: silu, gelu_pytorch_tanh
    embed_scale: float | None  # None = embeddings as they are
    attn_scale: float  # softmax scale
    attn_softcap: float | None  # logits -> cap * tanh(logits / cap) before the softmax
    final_softcap: float | None  # the same on the LM head's output
    layer_types: tuple[str, ...]  # GLOBAL / LOCAL per layer
    sliding_window: int | None  # W of the LOCAL layers: a query sees the W keys at distance 0..W-1
    rope_types: dict[str | None, str]  # rope key (a layer type, or None for one RoPE) -> rope type

    @property
    def plain(self) -> bool:
        """Llama / Mistral / Qwen2: the layer shape the engine ran before layouts (its ops, unchanged)."""
        f = self.family
        return not (f.fused_qkv or f.fused_gate_up or f.qk_norm or f.sandwich or f.gemma_norm) and \
            self.embed_scale is None and self.final_softcap is None

    @property
    def global_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == GLOBAL]

    @property
    def local_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == LOCAL]

    def rope_key(self, layer_type: str) -> str | None:
        """The key `Rope` takes for a layer of this type: the layer type where RoPE differs per type, else None."""
        return layer_type if self.family.per_type_rope else None


def _rope_type(params: dict | None) -> str:
    params = params or {}
    return str(params.get("rope_type", params.get("type", "default")))


def layout(config) -> Layout:
    """The layout of a transformers config; UserError for what the engine cannot run."""
    mt = getattr(config, "model_type", None)
    if mt not in FAMILIES:
        raise UserError(f"Model architecture '{mt}' is not supported; supported: {', '.join(FAMILIES)}.")
    fam = FAMILIES[mt]
    H = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // H
    n = config.num_hidden_layers
    types = tuple(getattr(config, "layer_types", None) or [])
    window = getattr(config, "sliding_window", None) or None
    if not types:  # llama / mistral / phi3: one window (or none) for every layer
        types = (LOCAL if window and _uniform_window_applies(config) else GLOBAL,) * n
    odd = sorted(set(types) - {GLOBAL, LOCAL})
    if odd:
        raise UserError(f"Model architecture '{mt}' has layers of type {odd[0]!r}; supported layer types: "
                        f"{GLOBAL}, {LOCAL}.")
    if LOCAL in types and not window:
        types = (GLOBAL,) * n  # layer types name sliding layers but no window is set (Qwen: use_sliding_window)
    if GLOBAL not in types:
        raise UserError(f"Model architecture '{mt}' with a sliding attention window ({window}) on every layer is "
                        "not supported: a context method would replace no layer; supported: models with full "
                        "attention on some layers.")
    rope = getattr(config, "rope_parameters", None) or {}
    if fam.per_type_rope:
        rope_types = {t: _rope_type(rope.get(t)) for t in sorted(set(types))}
        partial = [rope.get(t, {}).get("partial_rotary_factor", 1.0) for t in set(types)]
    else:
        rope_types = {None: _rope_type(rope)}
        partial = [rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))]
    if any(float(p or 1.0) != 1.0 for p in partial):
        raise UserError(f"Model architecture '{mt}' with partial rotary embeddings (partial_rotary_factor "
                        f"{partial[0]}) is not supported; supported: RoPE over the whole head.")
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    qpas = getattr(config, "query_pre_attn_scalar", None) if fam.sandwich else None
    return Layout(
        model_type=mt, family=fam, activation=str(act),
        embed_scale=config.hidden_size**0.5 if fam.embed_scaled else None,
        attn_scale=float(qpas if qpas is not None else head_dim) ** -0.5,
        attn_softcap=getattr(config, "attn_logit_softcapping", None) or None,
        final_softcap=getattr(config, "final_logit_softcapping", None) or None,
        layer_types=types, sliding_window=int(window) if LOCAL in types else None, rope_types=rope_types,
    )


def _uniform_window_applies(config) -> bool:
    """Whether a `sliding_window` set on a model without `layer_types` restricts its attention: Qwen only with
    use_sliding_window; a window at least max_position_embeddings long never slides within the model's context
    (Phi-3.5's 262144 for 131072 positions) and counts as none."""
    if config.model_type in ("qwen2", "qwen3") and not getattr(config, "use_sliding_window", False):
        return False
    max_pos = getattr(config, "max_position_embeddings", None)
    return not (max_pos and config.sliding_window >= max_pos)


#: rope types whose frequencies depend on the length of the sequence seen so far (the largest position of a call):
#: a method that moves keys or queries to other positions would rotate them with the frequencies of a shorter
#: sequence than the one it holds
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")
#: rope types whose cos / sin are multiplied by an attention factor (transformers' `attention_scaling`)
SCALED_ROPE = ("yarn", "longrope")

#: `local_layers` values: what runs on the sliding-window layers of a model that mixes them with global layers
LOCAL_LAYERS = {
    "native": "the model's own sliding window, exact; the context method runs on the global layers only",
    "method": "the context method on every layer, each layer with its own RoPE (the local window is not applied)",
}


def check_local_layers(value: str, lay: Layout, model_name: str) -> None:
    """Refuse an unknown `local_layers`, and `method` on a model without local layers (it would change nothing)."""
    if value not in LOCAL_LAYERS:
        raise UserError(f"Invalid local_layers '{value}'; allowed values: {', '.join(LOCAL_LAYERS)}.")
    if value != "native" and not lay.local_layers:
        raise UserError(f"local_layers={value} has no effect on {model_name}: it has no sliding-window layers "
                        "(every layer is global, and the method runs on all of them); drop the setting.")


def layer_plan(layer_types, window: int | None, local_layers: str, method: str) -> str:
    """One line: what attention each layer runs, e.g. 'infllm on layers 5, 11, 17 (global); the model's own sliding
    window of 512 tokens on the other 15 (local)'. `layer_types`: a Layout's, or `plan.model_shape`'s."""
    types = list(layer_types)
    glob = [i for i, t in enumerate(types) if t == GLOBAL]
    n, n_loc = len(types), len(types) - len(glob)
    if not n_loc:
        return f"{method} on all {n} layers"
    if local_layers == "method":
        return (f"{method} on all {n} layers, the {n_loc} local ones included (local_layers=method: their window "
                f"of {window} is not applied)")
    return (f"{method} on layers {', '.join(map(str, glob))} (global); the model's own sliding window of "
            f"{window} tokens on the other {n_loc} (local)")
