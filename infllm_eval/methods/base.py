"""The context-method interface.

The engine runs the model's own modules layer by layer and hands each attention layer's **un-rotated** q/k/v and
the absolute positions of the new tokens to the method. The method owns that layer's KV state and its position
scheme, and returns the attention output (before `o_proj`). The engine never checks which method it runs.

A method is one small class, registered in `infllm_eval.methods.METHODS` under the name configs give as `impl`:
`params` from `conf/method/<name>.yaml` (every key given there or in `conf/method/_base.yaml`: code holds no
defaults), `validate()` before any weights load, `new_state()` per layer per sample, `attend()` per layer per forward
call, `end_context()` once per sample between the context and the last prompt token, and `memory_model()`, what it
keeps at a context length, for `plan` and `bench` (no model needed).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from infllm_eval.errors import UserError
from infllm_eval.methods.kernels import fused_backend
from infllm_eval.rope import Rope


@dataclass
class ModelSpec:
    """What a method needs to know about the model it runs on."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    device: torch.device
    dtype: torch.dtype
    attn_scale: float | None = None  # softmax scale; None = head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    attn_softcap: float | None = None  # Gemma 2's attention logit soft-capping; None = none
    rope_layer_type: str | None = None  # the layer type whose RoPE the method's layers use (Gemma 3); None = one RoPE
    layers: tuple[int, ...] | None = None  # the layers the method runs on, in order (mixed layouts); None = all
    offload_dir: str | None = None  # the run's `offload_dir`: a directory for file-backed unit storage, or None

    @property
    def first_layer(self) -> int:
        """The first layer the method runs on: its state is created first for each sample, its `attend` runs first
        in each forward call."""
        return self.layers[0] if self.layers else 0


class ContextMethod:
    """Base class. Subclasses set `name`, `position_scheme`, and implement `new_state` and `attend`."""

    name: ClassVar[str] = ""
    position_scheme: ClassVar[str] = ""  # recorded in provenance, e.g. "true" / "fixed-distance" / "in-cache"
    param_names: ClassVar[tuple[str, ...]] = ("base", "distance_scale")  # accepted keys of `method.params`
    #: keys every method accepts on top of its own (conf/method/_base.yaml): `fattn` (the reference's switch between
    #: its Triton kernel and its torch implementation) = fused attention kernels where the device has one (true) or
    #: the explicit tiled PyTorch path for every stage (false); both compute the same fp32 softmax (tests), so it
    #: changes speed only; `q_tile`, queries per attention tile (bounds the score workspace)
    shared_params: ClassVar[tuple[str, ...]] = ("fattn", "q_tile")
    #: whether `attend` applies `self.softcap` (attention logit soft-capping, Gemma 2) to every score it softmaxes;
    #: a method that does not is refused on such a model (`bind`)
    supports_softcap: ClassVar[bool] = False
    #: whether the method rotates keys that are already rotated (RoPE is relative: rot(rot(k, a), b) = rot(k, a + b)),
    #: which fails for rope types whose cos / sin carry an attention factor (yarn, longrope): it is applied twice
    composes_rotations: ClassVar[bool] = False

    #: whether the method keeps long-lived K/V in unit storage (`memory.UnitStore`) that the run's `offload_dir`
    #: moves into files; a method without it refuses offload_dir (the key would change nothing)
    stores_units: ClassVar[bool] = False

    def __init__(self, **params: Any):
        self.params = params
        self.spec: ModelSpec | None = None
        self.rope: Rope | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    @property
    def q_tile(self) -> int:
        """Queries per attention tile: bounds the score workspace and keeps it in cache (measured)."""
        return self.params["q_tile"]

    def validate(self) -> None:
        """Raise UserError for impossible parameters. Called before any model weights load (subclasses call
        super().validate() first)."""
        missing = [k for k in (*self.param_names, *self.shared_params) if k not in self.params]
        if missing:
            raise UserError(f"method.params.{missing[0]} is missing for method '{self.name}'; every key comes from "
                            f"conf/method/ (a method config starts with `defaults: [_base, _self_]`).")
        if not isinstance(self.params["fattn"], bool):
            raise UserError(f"method.params.fattn must be true (fused attention kernels where the device has one) or "
                            f"false (the explicit PyTorch path), got {self.params['fattn']!r}.")
        q_tile = self.params["q_tile"]
        if not isinstance(q_tile, int) or isinstance(q_tile, bool) or q_tile <= 0:
            raise UserError(f"method.params.q_tile must be a positive integer, got {q_tile!r}.")

    def check_name(self, name: str) -> None:
        """Raise UserError when `name` (`method.name`: the label of run directories, records and report rows) would
        present these parameters as another variant's results. Any name by default."""

    def check_chunk_size(self, chunk_size: int) -> None:
        """Raise UserError when prefill calls of `chunk_size` tokens would break this method (SirLLM: a call's
        tokens must fit its cache). Called with the run's `chunk_size` before any weights load. Any by default."""

    def check_rope_type(self, rope_type: str) -> None:
        """Raise UserError when the model's RoPE of the layers this method runs on (`rope_type`: default, linear,
        dynamic, llama3, longrope, yarn) cannot be combined with this method's positions. Called before any weights
        load (`runner.prepare_cell`). `dynamic` and `longrope` compute their frequencies from the largest position
        of a call (the sequence length so far): a method that moves keys or queries to other positions, or scales
        them (distance_scale), would rotate with the frequencies of another length than the one it holds."""
        from infllm_eval.layout import LENGTH_DEPENDENT_ROPE, SCALED_ROPE

        remaps = not self.position_scheme.startswith("true") or self.params.get("distance_scale") not in (None, 1, 1.0)
        if rope_type in LENGTH_DEPENDENT_ROPE and remaps:
            raise UserError(f"Method '{self.name}' moves tokens to other positions ({self.position_scheme}), which "
                            f"the model's rope scaling '{rope_type}' cannot follow (its frequencies depend on the "
                            "largest position seen); use a method at true positions (full, quest, snapkv, h2o, hip, "
                            "infllmv2) or a model without this scaling.")
        if rope_type in SCALED_ROPE and self.composes_rotations:
            raise UserError(f"Method '{self.name}' rotates keys already rotated, which applies the attention factor "
                            f"of the model's rope scaling '{rope_type}' twice; use another method or a model "
                            "without this scaling.")

    def bind(self, model, spec: ModelSpec) -> None:
        """Attach to a loaded model (builds the rotary helper with this method's base / distance_scale, for the RoPE
        of the layers the method runs on: `spec.rope_layer_type`)."""
        if spec.attn_softcap is not None and not self.supports_softcap:
            raise UserError(f"Method '{self.name}' does not apply attention logit soft-capping, which this model "
                            f"uses ({spec.attn_softcap}); use full, streamingllm or lminfinite on it.")
        self.spec = spec
        self.rope = Rope(model, base=self.params["base"], distance_scale=self.params["distance_scale"],
                         layer_type=spec.rope_layer_type)
        self.scale = spec.attn_scale if spec.attn_scale is not None else spec.head_dim**-0.5
        self.softcap = spec.attn_softcap
        self.fattn = bool(self.params["fattn"])

    def attention_backend(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """The kernel this method's unmasked stages run on (recorded in provenance): see `kernels.fused_backend`."""
        return fused_backend(device, dtype) if self.params["fattn"] else "explicit"

    def new_state(self, layer_idx: int) -> Any:
        raise NotImplementedError

    def append_rotated(self, state: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p0: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The true-position cache of methods that keep every token (state["kv"], a KVBuffer, None at first):
        rotates q and k at p0, p0 + 1, ..., appends k/v -> (rotated q, all keys, all values), keys at 0..T-1."""
        q, k = self.rope.rotate_range(q, p0), self.rope.rotate_range(k, p0)
        if state["kv"] is None:
            state["kv"] = KVBuffer(k, capacity=max(1024, k.shape[2]))
        state["kv"].append(k, v)
        return (q, *state["kv"].view())

    def attend(self, state: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """q [B, H, L, D], k/v [B, H_kv, L, D] un-rotated; pos [L] absolute positions -> output [B, H, L, D],
        written into `out` when given (the engine passes a strided view of its reusable buffer, so no
        chunk-sized output is allocated per layer) and returned.

        q, k and v are views of the engine's reusable buffers, valid only during this call: copy what the state
        keeps (the next layer overwrites them)."""
        raise NotImplementedError

    def end_context(self, states: list) -> None:
        """Called once per sample by `Engine.prefill` with every layer's state, after the context (prompt[:-1]) has
        gone through `attend` and before the last prompt token's call; every later call of the sample is one token
        (the last prompt token, then one per decoding step). A method that acts at the end of the prompt hooks
        here, whatever the chunk size (with `chunk_size` 1 a call's shape cannot tell the context from decoding):
        SnapKV / H2O compress the context, Quest's decode-time page selection starts. Nothing by default: it is
        called once per sample, off every method's per-call path. Code that drives `Engine.forward` itself (the
        probes) does not call it."""

    # -- token surprisals (methods that rank tokens by the model's own -log p) ----------------------------------
    #: True: after each forward call the engine computes the LM head over every position of the call (in row
    #: tiles, never a [L, V] block) and calls `observe_token_nll` with the call's token surprisals before the
    #: sample's next call. False (every method but SirLLM): the LM head runs for the last position only, when logits
    #: are asked for; the engine's only cost is reading this flag once per forward call
    wants_token_nll: ClassVar[bool] = False

    def observe_token_nll(self, states: list, nll: torch.Tensor, nll_own: torch.Tensor) -> None:
        """The surprisals of the L tokens x[0..L-1] of the call that just ran (fp32, [L], on the device), z[j] being
        the model's logits at the call's position j:
        - nll[j] = -log softmax(z[j-1])[x[j]]: each token's -log p given everything before it; for j = 0, z[-1] is
          the last position of the sample's previous call (a decoded token: the step that produced it), NaN on a
          sample's first call (position 0 has no predecessor);
        - nll_own[j] = -log softmax(z[j])[x[j]]: each position's logits scored at its own input token (what the
          SirLLM code's `_cal_selfinfo` gathers; kept for its bug switch).
        `states` is the sample's list of per-layer states, as `attend` gets them. Called only when
        `wants_token_nll`."""
        raise NotImplementedError

    def check_offload_dir(self, offload_dir: str | None, device: str) -> None:
        """Refuses a set `offload_dir` the method would not use (before weights load; `bind` calls it again)."""
        if offload_dir is not None and not self.stores_units:
            raise UserError(f"offload_dir is set, but method {self.name} keeps no memory units for it to hold "
                            "(only infllm does); unset offload_dir for this method.")

    # -- accounting for `infllm-eval plan` and `infllm-eval bench` ----------------------------------------------
    def memory_model(self, length: int, chunk: int, device: str) -> dict[str, int]:
        """What this method keeps per layer once the context holds `length` tokens (prompt + generated), prefilled in
        chunks of `chunk` tokens (<= the prompt), on a `device` of type "cuda" or "cpu"; from `params` alone (no
        model): `device_tokens` / `host_tokens`, the tokens whose K/V sit on the compute device / are offloaded to
        host memory, and `workspace_keys`, the most keys one query tile is scored against (the fp32 score
        workspace). Every method states its own: none is assumed to behave like full attention."""
        raise UserError(f"Method '{self.name}' ({type(self).__module__}.{type(self).__name__}) defines no "
                        f"memory_model(), which plan and bench need to estimate its memory; add one.")

    def attended_keys(self, p: int) -> int:
        """How many keys the query at absolute position p attends to (the attention work this method does)."""
        return p + 1

    # -- prefix reuse (`prefix_reuse`): the states after a prompt prefix, kept and restored ------------------------
    def snapshot_states(self, states: list) -> Any:
        """What `restore_states` needs to give back the states of this method's layers as they are now (called
        between prefill chunks, before `end_context`). Default: one deep copy of them all (right for any state,
        objects the layers share stay shared; costly for a long one); a method whose long-lived storage only grows
        overrides it to keep a length instead of a copy (InfLLM, full attention)."""
        return copy.deepcopy(states)

    def restore_states(self, snap: Any) -> list:
        """Live states equal to those `snapshot_states` saw; the snapshot stays usable (several samples may
        restore it). Restores come in non-increasing prefix length after the snapshots were taken, so storage that
        only grows may be rewound: what a restored state writes lies beyond every later restore's prefix."""
        return copy.deepcopy(snap)

    def memory_stats(self, states: list) -> dict[str, Any]:
        """What the method stored in this sample, for its record (`memory`); {} records nothing."""
        return {}

    def kv_bytes(self, states: list) -> dict[str, int]:
        """Bytes of the K/V the states hold (tokens stored, not buffer capacity) on the compute device and
        offloaded to host memory, over all layers."""
        return {"device": sum(stored_bytes(s) for s in states), "offloaded": 0}

    #: parameters added after results were recorded, with the value that reproduces the earlier behaviour; at that
    #: value they are left out of `describe()`, so finished results keep their keys (they resume and report as one).
    #: Compatibility facts, not defaults (those live in conf/ only): a value here equals today's conf default only
    #: because the option was added with the old behaviour as its default, and must stay as it is if conf changes
    neutral: ClassVar[dict[str, Any]] = {}
    shared_neutral: ClassVar[dict[str, Any]] = {"fattn": True}
    #: shared keys that change speed / memory only and never were part of a result key: `describe()` leaves them out
    undescribed: ClassVar[tuple[str, ...]] = ("q_tile",)

    def describe(self) -> dict:
        """Resolved parameters and semantics, for provenance and result keys."""
        neutral = {**self.shared_neutral, **self.neutral}
        params = {k: v for k, v in self.params.items()
                  if k not in self.undescribed and not (k in neutral and v == neutral[k])}
        return {"name": self.name, "position_scheme": self.position_scheme, **params}


def stored_bytes(obj) -> int:
    """Bytes of the K/V reachable from a state (dicts, lists, objects with __dict__): a buffer with `nbytes()`
    counts the tokens it stores, any other tensor its storage (each storage once)."""
    seen, total, todo = set(), 0, [obj]
    while todo:
        x = todo.pop()
        if hasattr(x, "nbytes") and callable(x.nbytes) and not isinstance(x, torch.Tensor):
            total += x.nbytes()
        elif isinstance(x, torch.Tensor):
            key = x.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += x.untyped_storage().nbytes()
        elif isinstance(x, dict):
            todo.extend(x.values())
        elif isinstance(x, (list, tuple)):
            todo.extend(x)
        elif hasattr(x, "__dict__"):
            todo.extend(vars(x).values())
    return total


class KVBuffer:
    """A growable [B, H_kv, T, D] key/value store written by index (amortised doubling, no torch.cat per step)."""

    def __init__(self, like: torch.Tensor, capacity: int = 1024):
        B, Hkv, _, D = like.shape
        self.k = like.new_empty(B, Hkv, capacity, D)
        self.v = like.new_empty(B, Hkv, capacity, D)
        self.len = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[2]
        if self.len + n > self.k.shape[2]:
            cap = max(self.len + n, 2 * self.k.shape[2])
            for name in ("k", "v"):
                old = getattr(self, name)
                new = old.new_empty(old.shape[0], old.shape[1], cap, old.shape[3])
                new[:, :, : self.len] = old[:, :, : self.len]
                setattr(self, name, new)
        self.k[:, :, self.len : self.len + n] = k
        self.v[:, :, self.len : self.len + n] = v
        self.len += n

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[:, :, : self.len], self.v[:, :, : self.len]

    def rewind(self, n: int) -> "KVBuffer":
        """Back to the first n tokens (written once, never changed: prefix reuse); later appends overwrite the rest."""
        assert 0 <= n <= self.len
        self.len = n
        return self

    def nbytes(self) -> int:
        return 2 * self.len * self.k[:, :, :1].numel() * self.k.element_size()
