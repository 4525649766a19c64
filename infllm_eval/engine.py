"""The inference engine: our own layer loop and greedy decoding (not `model.generate`).

Data flow per sample: the prompt minus its last token is prefilled in `chunk_size` chunks (no LM head), the method
hears that the context is in (`end_context`), then the last prompt token alone (it does its own decoding-style
lookup, as the reference's GreedySearch), then greedy decoding one token at a time until EOS / an extra stop token /
`max_new_tokens`. Positions are explicit and absolute; the context method owns each layer's KV state and position
scheme. A method that declares `wants_token_nll` (SirLLM) also gets every token's -log p after each call (the LM
head over all positions, tiled).

Supported families (`infllm_eval.layout`): Llama (3.x rope scaling included), Mistral, Qwen2 / Qwen2.5, Qwen3,
Phi-3 / Phi-3.5, Gemma 2, Gemma 3 (text). One layer loop runs them all, driven by the model's `Layout` (fused or
separate projections, where the norms sit and their flavour, q/k norms, activation, embedding scale, soft-capping);
Llama / Mistral / Qwen2 take exactly the ops they took before layouts. On a model that mixes global and
sliding-window layers, the context method replaces the global layers; the local layers keep the model's own window,
computed exactly by `SlidingWindowAttention` with their own RoPE.
"""

from __future__ import annotations

import copy
import resource
import time
from dataclasses import dataclass, field, replace

import torch

from infllm_eval.layout import GLOBAL, LOCAL, Layout, check_local_layers, layout
from infllm_eval.methods import ContextMethod, ModelSpec
from infllm_eval.methods.memory import MMAP_THRESHOLD, glibc
from infllm_eval.methods.sliding import SlidingWindowAttention


@dataclass
class Generation:
    tokens: list[int]
    prefill_s: float
    decode_s: float
    peak_mem_bytes: int
    stopped_by: str  # "eos" | "max_new_tokens"
    extra: dict = field(default_factory=dict)


#: bytes of one fp32 logits tile [rows, V] of `Engine._token_nll` (the methods that want token surprisals):
#: 16 MB = 85 rows of SmolLM2's vocab of 49152
NLL_TILE_BYTES = 16 * 2**20


class SampleTimeout(Exception):
    """A sample ran past `sample_timeout_s`; checked between prefill chunks and between decode steps."""


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.perf_counter() > deadline:
        raise SampleTimeout("sample ran past sample_timeout_s")


def model_spec(model, device, dtype, lay: Layout | None = None) -> ModelSpec:
    """The spec of the model's global layers (those the context method runs on)."""
    cfg = model.config
    H = cfg.num_attention_heads
    lay = lay or layout(cfg)
    return ModelSpec(
        n_layers=cfg.num_hidden_layers,
        n_heads=H,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or H,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // H,
        device=device,
        dtype=dtype,
        attn_scale=lay.attn_scale,
        attn_softcap=lay.attn_softcap,
        rope_layer_type=lay.rope_key(GLOBAL),
        layers=tuple(lay.global_layers) if lay.local_layers else None,
    )


def _keep_freed_memory_on_cpu() -> None:
    """glibc hands large freed buffers back to the OS, so every large temporary of the attention tiles page-faults
    again on its next use. Raising the mmap and trim thresholds keeps them in the heap (measured: ~2x faster
    InfLLM prefill on CPU). Same effect as MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_; no-op off glibc."""
    libc = glibc()
    if libc:
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD


def _reset_peak_rss() -> bool:
    """Resets the process's peak resident set (Linux: writing 5 to /proc/self/clear_refs resets VmHWM), so the
    next `_peak_rss_bytes` is the peak since now; False where that is not possible (the peak is then the
    process's since it started)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """Peak resident set of the process: VmHWM (reset by `_reset_peak_rss`), else getrusage's ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Workspace:
    """Named activation buffers kept across forward passes; each grows (never shrinks) to the largest chunk seen."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, cols: int) -> torch.Tensor:
        """A contiguous [rows, cols] view of buffer `name` (contents undefined)."""
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < rows * cols:
            self.bufs.pop(name, None)  # free the old one before allocating the larger one
            buf = self.bufs[name] = torch.empty(rows * cols, device=self.device, dtype=self.dtype)
        return buf[: rows * cols].view(rows, cols)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.bufs.values())


def _linear(lin: torch.nn.Linear, x: torch.Tensor, out: torch.Tensor) -> None:
    """out = lin(x) for 2-D x, written into `out` (the same BLAS call F.linear makes)."""
    if lin.bias is None:
        torch.mm(x, lin.weight.t(), out=out)
    else:
        torch.addmm(lin.bias, x, lin.weight.t(), out=out)


def _rms_norm(norm, h: torch.Tensor, out: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None = None
              ) -> None:
    """out = norm(h) for Llama/Mistral/Qwen2's RMSNorm: weight * (h * rsqrt(mean(h^2) + eps)), in fp32 like HF.
    `weight`: the factor to use instead of norm.weight (Gemma's 1 + weight, `Engine._norm_weight`).
    Other dtypes go through the module (it upcasts to fp32 and back, which needs temporaries anyway)."""
    if h.dtype != torch.float32:
        out.copy_(norm(h))
        return
    torch.mul(h, h, out=out)
    torch.mean(out, dim=-1, keepdim=True, out=var)
    var.add_(norm.variance_epsilon if weight is None else getattr(norm, "eps", None) or norm.variance_epsilon).rsqrt_()
    torch.mul(h, var, out=out)
    out.mul_(norm.weight if weight is None else weight)


def _head_rms_norm(norm, x: torch.Tensor, weight: torch.Tensor) -> None:
    """x [L, heads, D] <- norm(x) per head in place (Qwen3 / Gemma 3 q_norm, k_norm), fp32 math like HF."""
    if x.dtype != torch.float32:
        x.copy_(norm(x))
        return
    eps = getattr(norm, "variance_epsilon", None) or norm.eps
    var = x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    x.mul_(var).mul_(weight)


def _activate(gate: torch.Tensor, name: str) -> None:
    """gate <- act(gate) in place (transformers' ACT2FN name)."""
    if name == "silu":
        torch.nn.functional.silu(gate, inplace=True)
    elif name == "gelu_pytorch_tanh":
        gate.copy_(torch.nn.functional.gelu(gate, approximate="tanh"))
    else:
        from transformers.activations import ACT2FN

        gate.copy_(ACT2FN[name](gate))


def _gated_mlp(mlp, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor) -> None:
    """out = down_proj(act(gate_proj(x)) * up_proj(x)), the MLP of Llama/Mistral/Qwen2, into fixed buffers."""
    _linear(mlp.gate_proj, x, gate)
    if type(mlp.act_fn).__name__ in ("SiLU", "SiLUActivation"):  # torch's and transformers' SiLU modules
        torch.nn.functional.silu(gate, inplace=True)
    else:
        gate.copy_(mlp.act_fn(gate))
    _linear(mlp.up_proj, x, up)
    gate.mul_(up)
    _linear(mlp.down_proj, gate, out)


def _layer_states(states: list, layers: list[int]) -> list:
    """The states of `layers` (the list itself when they are every layer)."""
    return states if len(layers) == len(states) else [states[i] for i in layers]


class Engine:
    """Runs one model with one context method. `generate` handles one sample at a time (batch size 1)."""

    def __init__(self, model, method: ContextMethod, device: torch.device, dtype: torch.dtype,
                 local_layers: str = "native", offload_dir: str | None = None):
        self.model = model
        self.inner = model.model
        self.method = method
        self.device = device
        self.layout = lay = layout(model.config)
        check_local_layers(local_layers, lay, getattr(model.config, "model_type", "?"))
        self.spec = replace(model_spec(model, device, dtype, lay), offload_dir=offload_dir)
        method.check_rope_type(lay.rope_types[lay.rope_key(GLOBAL)])  # also refused before weights (runner)
        #: the attention of each layer: the context method on global layers, the model's own window on local ones
        #: (local_layers=native), or the method on every layer (local_layers=method: on a model with a RoPE per
        #: layer type, a second instance of the method, bound with the local layers' RoPE, runs the local layers)
        self.local = None
        self.groups: list[tuple[ContextMethod, list[int]]] = [(method, list(range(len(lay.layer_types))))]
        if lay.local_layers and local_layers == "native":
            self.local = SlidingWindowAttention(lay.sliding_window, fattn=bool(method.params["fattn"]),
                                                q_tile=method.params["q_tile"])
            self.local.bind(model, replace(self.spec, rope_layer_type=lay.rope_key(LOCAL)))
            self.groups = [(method, lay.global_layers)]
        elif lay.local_layers and lay.rope_key(LOCAL) != lay.rope_key(GLOBAL):
            method.check_rope_type(lay.rope_types[lay.rope_key(LOCAL)])
            self.local = copy.deepcopy(method)  # unbound: the same params, its own spec
            self.local.bind(model, replace(self.spec, rope_layer_type=lay.rope_key(LOCAL),
                                           layers=tuple(lay.local_layers)))
            self.spec = replace(self.spec, layers=tuple(lay.global_layers))
            self.groups = [(method, lay.global_layers), (self.local, lay.local_layers)]
        elif lay.local_layers:  # one RoPE for every layer (Gemma 2): the method runs them all
            self.spec = replace(self.spec, layers=None)
        self.attn_of = [self.local if (t == LOCAL and self.local is not None) else method for t in lay.layer_types]
        self.method_layers = self.groups[0][1]
        self._weights: dict[int, torch.Tensor] = {}  # id(norm) -> 1 + weight in fp32 (Gemma's RMSNorm)
        self._embed_scale = None
        if lay.embed_scale is not None:  # HF: sqrt(hidden) in the embedding's dtype
            self._embed_scale = torch.tensor(lay.embed_scale, device=device).to(self.inner.embed_tokens.weight.dtype)
        self.mlp_rows = None  # tokens per MLP call; None = the whole chunk
        if device.type == "cpu":
            _keep_freed_memory_on_cpu()
            # the MLP runs on row slices whose [rows, intermediate] buffers stay below glibc's mmap threshold
            # (32 MB at most); introduced when they were per-call temporaries (fresh pages that faulted on every
            # use: SiLU on SmolLM2's 8192 x 1536 took 49 ms); with the Workspace it now bounds the buffers' size
            inter = getattr(model.config, "intermediate_size", 0) or 1
            self.mlp_rows = max(256, MMAP_THRESHOLD // (inter * torch.finfo(dtype).bits // 8) // 256 * 256)
        self.ws = Workspace(device, dtype)
        self._nll_carry: tuple[int, torch.Tensor] | None = None  # (next position, last logits [V]): `_token_nll`
        method.bind(model, self.spec)

    # -- one forward pass over new tokens ------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, states: list, ids: torch.Tensor, start: int, logits: bool) -> torch.Tensor | None:
        """ids [1, L] at absolute positions start..start+L-1; returns last-position logits [V] if asked. For a method
        that declares `wants_token_nll`, the LM head runs over every position and the method gets the call's token
        surprisals after the layer loop (`_token_nll`), before the sample's next call.

        The chunk's activations (hidden states, normed input, q/k/v, attention output, MLP slices) live in buffers
        the engine keeps from chunk to chunk (`Workspace`), written with `out=` ops: no large temporary is
        allocated per layer, so the heap does not fragment and the workspace does not depend on the run's history.
        Same math, op for op, as the HF modules (RMSNorm, Linear, gated MLP)."""
        s, ws, lay = self.spec, self.ws, self.layout
        if not lay.plain:
            return self._forward_layout(states, ids, start, logits)
        L = ids.shape[1]
        hidden = self.model.config.hidden_size
        h = ws.get("h", L, hidden)
        torch.index_select(self.inner.embed_tokens.weight, 0, ids[0], out=h)
        x, var = ws.get("x", L, hidden), ws.get("var", L, 1)
        q = ws.get("q", L, s.n_heads * s.head_dim)
        k, v = ws.get("k", L, s.n_kv_heads * s.head_dim), ws.get("v", L, s.n_kv_heads * s.head_dim)
        o_flat = ws.get("o", L, s.n_heads * s.head_dim)
        rows = min(L, self.mlp_rows or L)
        inter = self.model.config.intermediate_size
        gate, up, down = ws.get("gate", rows, inter), ws.get("up", rows, inter), ws.get("down", rows, hidden)
        o_heads = o_flat.view(1, L, s.n_heads, s.head_dim).transpose(1, 2)  # [1, H, L, D]: attention output
        pos = torch.arange(start, start + L, device=self.device)
        for layer, state, impl in zip(self.inner.layers, states, self.attn_of):
            attn = layer.self_attn
            _rms_norm(layer.input_layernorm, h, x, var)
            _linear(attn.q_proj, x, q)
            _linear(attn.k_proj, x, k)
            _linear(attn.v_proj, x, v)
            o = impl.attend(state, q.view(1, L, s.n_heads, s.head_dim).transpose(1, 2),
                            k.view(1, L, s.n_kv_heads, s.head_dim).transpose(1, 2),
                            v.view(1, L, s.n_kv_heads, s.head_dim).transpose(1, 2), pos, out=o_heads)
            if o is not o_heads:  # a method that allocates its own output
                o_heads.copy_(o)
            _linear(attn.o_proj, o_flat, x)  # x is free until the next norm
            h.add_(x)
            _rms_norm(layer.post_attention_layernorm, h, x, var)
            for r in range(0, L, rows):  # the MLP is per token: row slices give the same result
                n = min(rows, L - r)
                _gated_mlp(layer.mlp, x[r : r + n], gate[:n], up[:n], down[:n])
                h[r : r + n].add_(down[:n])
        return self._finish(states, h, ids, start, logits)

    def _finish(self, states: list, h: torch.Tensor, ids: torch.Tensor, start: int, logits: bool
                ) -> torch.Tensor | None:
        if self.method.wants_token_nll:  # the one check other methods pay
            return self._token_nll(states, h, ids, start, logits)
        if not logits:
            return None
        return self._head(h[-1:])[-1].float()

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head over rows h [n, hidden] (final norm, lm_head, Gemma 2's final soft-capping) -> [n, V]."""
        z = self.model.lm_head(self.inner.norm(h))
        cap = self.layout.final_softcap
        if cap is not None:
            z = torch.tanh(z / cap) * cap
        return z

    def _norm_weight(self, norm) -> torch.Tensor | None:
        """The factor of an RMSNorm for `_rms_norm`: None (its weight) unless the family's RMSNorm multiplies by
        1 + weight in fp32 (Gemma), computed once."""
        if not self.layout.family.gemma_norm:
            return None
        w = self._weights.get(id(norm))
        if w is None:
            w = self._weights[id(norm)] = 1.0 + norm.weight.float()
        return w

    def _norm(self, norm, h: torch.Tensor, out: torch.Tensor, var: torch.Tensor) -> None:
        _rms_norm(norm, h, out, var, self._norm_weight(norm))

    def _forward_layout(self, states: list, ids: torch.Tensor, start: int, logits: bool) -> torch.Tensor | None:
        """`forward` for the families whose layer differs from Llama's (`Layout.plain` false): the same loop with
        the layout's fused projections, q/k norms, sandwich norms, activation and embedding scale."""
        s, ws, lay, fam = self.spec, self.ws, self.layout, self.layout.family
        L = ids.shape[1]
        hidden = self.model.config.hidden_size
        h = ws.get("h", L, hidden)
        torch.index_select(self.inner.embed_tokens.weight, 0, ids[0], out=h)
        if self._embed_scale is not None:
            h.mul_(self._embed_scale)
        x, x2, var = ws.get("x", L, hidden), ws.get("x2", L, hidden), ws.get("var", L, 1)
        nq, nkv = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
        if fam.fused_qkv:
            qkv = ws.get("qkv", L, nq + 2 * nkv)
            q, k, v = qkv[:, :nq], qkv[:, nq : nq + nkv], qkv[:, nq + nkv :]
        else:
            q, k, v = ws.get("q", L, nq), ws.get("k", L, nkv), ws.get("v", L, nkv)
        o_flat = ws.get("o", L, nq)
        rows = min(L, self.mlp_rows or L)
        inter = self.model.config.intermediate_size
        if fam.fused_gate_up:
            gu = ws.get("gate_up", rows, 2 * inter)
            gate, up = gu[:, :inter], gu[:, inter:]
        else:
            gate, up = ws.get("gate", rows, inter), ws.get("up", rows, inter)
        down = ws.get("down", rows, hidden)
        o_heads = o_flat.view(1, L, s.n_heads, s.head_dim).transpose(1, 2)  # [1, H, L, D]: attention output
        pos = torch.arange(start, start + L, device=self.device)
        for layer, state, impl in zip(self.inner.layers, states, self.attn_of):
            attn, mlp = layer.self_attn, layer.mlp
            self._norm(layer.input_layernorm, h, x, var)
            if fam.fused_qkv:
                _linear(attn.qkv_proj, x, qkv)
            else:
                _linear(attn.q_proj, x, q)
                _linear(attn.k_proj, x, k)
                _linear(attn.v_proj, x, v)
            qh, kh = q.view(L, s.n_heads, s.head_dim), k.view(L, s.n_kv_heads, s.head_dim)
            if fam.qk_norm:
                for norm, heads in ((attn.q_norm, qh), (attn.k_norm, kh)):
                    w = self._norm_weight(norm)
                    _head_rms_norm(norm, heads, norm.weight if w is None else w)
            o = impl.attend(state, qh[None].transpose(1, 2), kh[None].transpose(1, 2),
                            v.view(1, L, s.n_kv_heads, s.head_dim).transpose(1, 2), pos, out=o_heads)
            if o is not o_heads:  # a method that allocates its own output
                o_heads.copy_(o)
            _linear(attn.o_proj, o_flat, x)  # x is free until the next norm
            if fam.sandwich:  # Gemma: the attention output is normed before the residual
                self._norm(layer.post_attention_layernorm, x, x2, var)
                h.add_(x2)
                self._norm(layer.pre_feedforward_layernorm, h, x, var)
            else:
                h.add_(x)
                self._norm(layer.post_attention_layernorm, h, x, var)
            for r in range(0, L, rows):  # the MLP is per token: row slices give the same result
                n = min(rows, L - r)
                g, u = gate[:n], up[:n]
                if fam.fused_gate_up:
                    _linear(mlp.gate_up_proj, x[r : r + n], gu[:n])
                else:
                    _linear(mlp.gate_proj, x[r : r + n], g)
                    _linear(mlp.up_proj, x[r : r + n], u)
                _activate(g, lay.activation)
                g.mul_(u)
                _linear(mlp.down_proj, g, down[:n])
                if fam.sandwich:
                    self._norm(layer.post_feedforward_layernorm, down[:n], x2[r : r + n], var[r : r + n])
                    h[r : r + n].add_(x2[r : r + n])
                else:
                    h[r : r + n].add_(down[:n])
        return self._finish(states, h, ids, start, logits)

    def _token_nll(self, states: list, h: torch.Tensor, ids: torch.Tensor, start: int, logits: bool
                   ) -> torch.Tensor | None:
        """For methods with `wants_token_nll`: the LM head over every position of the call, in row tiles (a
        [tile, V] fp32 block at a time, never [L, V]), reduced to the call's token surprisals, handed to
        `method.observe_token_nll`; returns the last position's logits if asked (no second LM head call).

        nll[j] = -log softmax(z[j-1])[x[j]], with z[-1] the previous call's last logits (kept here between the
        calls of a sample, NaN for the token at position 0); nll_own[j] = -log softmax(z[j])[x[j]]."""
        L, x = ids.shape[1], ids[0]
        nll = torch.empty(L, dtype=torch.float32, device=self.device)
        nll_own = torch.empty(L, dtype=torch.float32, device=self.device)
        carry = self._nll_carry
        nll[0] = carry[1].logsumexp(-1) - carry[1][x[0]] if carry is not None and carry[0] == start else float("nan")
        tile = max(1, NLL_TILE_BYTES // (4 * self.model.config.vocab_size))
        z = None
        for r in range(0, L, tile):
            n = min(tile, L - r)
            z = self._head(h[r : r + n]).float()  # [n, V]
            lse = z.logsumexp(-1)
            nll_own[r : r + n] = lse - z.gather(1, x[r : r + n, None])[:, 0]
            m = min(n, L - 1 - r)  # rows whose next token is in this call
            if m > 0:
                nll[r + 1 : r + 1 + m] = lse[:m] - z[:m].gather(1, x[r + 1 : r + 1 + m, None])[:, 0]
        last = z[-1]
        self._nll_carry = (start + L, last)
        self._each_method("observe_token_nll", states, nll, nll_own)
        return last if logits else None

    def new_states(self) -> list:
        """Every layer's state: the method's on its layers, the native window's on a mixed model's local layers."""
        return [impl.new_state(i) for i, impl in enumerate(self.attn_of)]

    def method_states(self, states: list) -> list:
        """The states of the layers the method runs on (all of them unless the model has local layers), what its
        `end_context`, `observe_token_nll` and `kv_bytes` get."""
        return _layer_states(states, self.method_layers)

    def attention_groups(self) -> list[tuple[ContextMethod, list[int]]]:
        """Every layer once, grouped by the attention that runs it: the method's instance(s), and the model's own
        window on a mixed model's local layers (local_layers=native); `bench` counts work and memory per group."""
        groups = list(self.groups)
        if self.local is not None and all(self.local is not impl for impl, _ in groups):
            groups.append((self.local, self.layout.local_layers))
        return groups

    def _each_method(self, hook: str, states: list, *args) -> None:
        """Calls `hook` of every method instance with the states of its layers (one instance, except with
        local_layers=method on a model with a RoPE per layer type)."""
        for impl, layers in self.groups:
            getattr(impl, hook)(_layer_states(states, layers), *args)

    # -- prefix reuse: the states after prompt[:c], kept and restored (`runner`'s prefix_reuse) ------------------
    def snapshot(self, states: list) -> tuple:
        """What `restore` needs to give back `states` as they are now, between two prefill chunks: each attention
        group's snapshot of its layers' states (`snapshot_states`), and the token-nll carry."""
        groups = self.attention_groups()
        return [(layers, impl.snapshot_states(_layer_states(states, layers))) for impl, layers in groups], \
            self._nll_carry

    def restore(self, snap: tuple) -> list:
        """Live states equal to those `snapshot` saw (the snapshot stays usable; see `restore_states`)."""
        groups, self._nll_carry = snap
        states = [None] * len(self.attn_of)
        for (impl, _), (layers, s) in zip(self.attention_groups(), groups):
            for i, st in zip(layers, impl.restore_states(s)):
                states[i] = st
        return states

    @torch.no_grad()
    def prefill(
        self, states: list, prompt: torch.Tensor, chunk_size: int, deadline: float | None = None,
        on_chunk=None, start: int = 0, snapshot_at: tuple[int, ...] = (), snapshots: dict | None = None,
    ) -> torch.Tensor:
        """Feeds prompt[:-1] in chunks, calls the method's `end_context`, then the last token alone; returns the
        logits after the prompt.
        `on_chunk(start, end)`, if given, is called after each chunk (`bench` times the chunks with it).
        Prefix reuse: `states` already hold prompt[:start] (`start` a multiple of chunk_size, so the chunks are
        the ones a fresh prefill cuts); after the chunk that ends at a position in `snapshot_at`,
        `snapshots[position] = self.snapshot(states)`."""
        ids = prompt.view(1, -1).to(self.device)
        n = ids.shape[1]
        if start % chunk_size or not 0 <= start <= max(0, n - 1):
            raise ValueError(f"prefill start {start} is not a chunk boundary of prompt[:-1] ({n - 1} tokens)")
        for st in range(start, n - 1, chunk_size):
            _check_deadline(deadline)
            end = min(st + chunk_size, n - 1)
            self.forward(states, ids[:, st:end], st, logits=False)
            if end in snapshot_at:
                snapshots[end] = self.snapshot(states)
            if on_chunk is not None:
                on_chunk(st, end)
        self._each_method("end_context", states)  # the context is in: a method's end-of-prompt point (base.py)
        return self.forward(states, ids[:, n - 1 :], n - 1, logits=True)

    @torch.no_grad()
    def generate(
        self, prompt: torch.Tensor, max_new_tokens: int, chunk_size: int, stop_ids: list[int],
        timeout_s: float | None = None, on_chunk=None, resume: tuple[int, tuple] | None = None,
        snapshot_at: tuple[int, ...] = (), snapshots: dict | None = None,
    ) -> Generation:
        """Greedy generation; raises SampleTimeout when `timeout_s` (None = no limit) runs out. `on_chunk(start,
        end)` is called after each prefill chunk (progress). The peak memory is this sample's: on CUDA the
        allocator's peak, on CPU the process's peak resident set since the sample started (where Linux can reset
        it, else since the process started). Prefix reuse: `resume` = (c, snapshot) starts from the states after
        prompt[:c] (prefill_s then counts prompt[c:] only); `snapshot_at` / `snapshots` as in `prefill`."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_peak_rss()
        t0 = time.perf_counter()
        start, states = (0, self.new_states()) if resume is None else (resume[0], self.restore(resume[1]))
        if resume is None:
            self._nll_carry = None
        deadline = None if timeout_s is None else t0 + timeout_s
        logits = self.prefill(states, prompt, chunk_size, deadline, on_chunk, start, snapshot_at, snapshots)
        self._sync()
        t1 = time.perf_counter()
        n = int(prompt.numel())
        tokens: list[int] = []
        stopped = "max_new_tokens"
        stop = set(stop_ids)
        for i in range(max_new_tokens):
            nxt = int(torch.argmax(logits))
            if nxt in stop:
                stopped = "eos"
                break
            tokens.append(nxt)
            if i + 1 == max_new_tokens:
                break
            _check_deadline(deadline)
            logits = self.forward(states, torch.tensor([[nxt]], device=self.device), n + i, logits=True)
        self._sync()
        t2 = time.perf_counter()
        peak = (
            torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else _peak_rss_bytes()
        )
        extra = {}
        for impl, layers in self.groups:
            stats = impl.memory_stats(_layer_states(states, layers))
            if stats:
                extra["memory"] = stats  # (one method instance per run records it; local_layers=method: the first)
                break
        return Generation(tokens, t1 - t0, t2 - t1, int(peak), stopped, extra)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
