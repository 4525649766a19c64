"""SirLLM (Yao et al., 2024, "SirLLM: Streaming Infinite Retentive LLM", arXiv 2405.12528; Zoeyyao27/SirLLM).

Mechanism: every token gets a score, its token entropy e = -log p(token | earlier tokens), from the model's own
logits (the engine hands the surprisals over: `wants_token_nll`). Before each forward call of m tokens, if the
cache would overflow (len + m > cache_size = start_size + recent_size + token_entropy_size), the cache keeps the
top `token_entropy_size - m` tokens by entropy (descending, ties: lower index first; none when that is <= 0), the
first `start_size` tokens, and fills up with the newest tokens (newest down to index 1) to cache_size - m, in cache
order; the same tokens in every layer. Retained entropies are then multiplied by `decay_ratio` (memory decay). Keys
are cached un-rotated and rotated at their slot in the cache at every call (StreamingLLM pos-shift): keys at
0..T-1, the call's queries at T-m..T-1, causal among the call's tokens, one softmax.

Harness mapping and departures ([inferred] = no source states it; methods-wave2.md section 3):
- `entropy_shift_fix` (bug switch, default true): the original's `_cal_selfinfo` gathers each position's logits at
  that position's own input token and shifts the list by one, so token i is scored -log softmax(z[i-1])[x[i-1]],
  not the paper's -log p(x[i] | x[<i]). true = the paper's surprisal; false = the code's values.
- `first_token` [inferred]: the original runs a whole dialogue turn in one call and gives each call's first token
  the max of the call's values (it has no logits before it). `call_max` does that for every forward call (every
  prefill chunk; a one-token call, the last prompt token and each decoded token, has no in-call value and takes
  the -log p from the step before it). `predicted` (default) gives every token but a sample's first its -log p
  from the previous position, whichever call computed it (a decoded token: the step that produced it), so the
  entropy list is the one a single call over the whole prompt would give, whatever `chunk_size` is. A sample's first
  token has no predecessor: it gets its call's max, or 0.0 when that call holds it alone (chunk_size 1); with
  start_size >= 1 it is kept regardless.
- `decay_per` [inferred]: the original decays once per turn; the harness has no turns. `call` = once per forward
  call (spec proposal, after the sample's first call, even when nothing was evicted), `token` = decay_ratio ** m
  for a call of m tokens (independent of how the prompt is chunked). Moot at decay_ratio 1.0 (default).
- chunk size [decided]: the original's m is a whole turn; here it is the prefill chunk, and each call's m tokens
  take m of the token_entropy_size slots. A call of m > cache_size - start_size tokens cannot fit (the original
  asserts): `check_chunk_size` refuses such a run in one sentence, and `attend` does for a direct call. Presets
  name the chunk they were meant for (conf/per_model/smollm2_sirllm.yaml).
- Shared bookkeeping: `new_state(0)` creates the sample's `_Sample` (entropies, this call's kept indices) and every
  later layer's state refers to it (the engine creates a sample's states in layer order); layer 0 decides the
  eviction in `attend`, every layer compacts its own un-rotated K/V with the same indices.
"""

from __future__ import annotations

import torch

from infllm_eval.errors import UserError
from infllm_eval.methods import METHODS
from infllm_eval.methods.base import ContextMethod, KVBuffer
from infllm_eval.methods.kernels import INF, Stage, multi_stage_attention

FIRST_TOKEN = ("predicted", "call_max")
DECAY_PER = ("call", "token")


class _Sample:
    """One sample's token bookkeeping, shared by its per-layer states (created by `new_state(0)`)."""

    def __init__(self):
        self.ent: torch.Tensor | None = None  # [n cached] fp64 entropies in cache order (None before the first call)
        self.keep: torch.Tensor | None = None  # cache indices this call's eviction keeps (None: no eviction)
        self.last_own: torch.Tensor | None = None  # the previous call's last nll_own (first_token=predicted, fix off)


@METHODS.register("sirllm")
class SirLLM(ContextMethod):
    name = "sirllm"
    position_scheme = "in-cache (pos-shift: keys at their cache slot 0..T-1, queries after them)"
    param_names = ("start_size", "recent_size", "token_entropy_size", "decay_ratio", "decay_per", "first_token",
                   "entropy_shift_fix", "base", "distance_scale")
    wants_token_nll = True

    def validate(self) -> None:
        super().validate()
        p = self.params
        for key, lo in (("start_size", 0), ("recent_size", 0), ("token_entropy_size", 1)):
            v = p[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise UserError(f"method.params.{key} must be an integer >= {lo}, got {v!r}.")
        d = p["decay_ratio"]
        if not isinstance(d, (int, float)) or isinstance(d, bool) or not 0 < d <= 1:
            raise UserError(f"method.params.decay_ratio must be a number in (0, 1], got {d!r}.")
        for key, allowed in (("decay_per", DECAY_PER), ("first_token", FIRST_TOKEN)):
            if p[key] not in allowed:
                raise UserError(f"method.params.{key} must be one of {', '.join(allowed)}, got {p[key]!r}.")
        if not isinstance(p["entropy_shift_fix"], bool):
            raise UserError(f"method.params.entropy_shift_fix must be true or false, got {p['entropy_shift_fix']!r}.")

    @property
    def cache_size(self) -> int:
        p = self.params
        return p["start_size"] + p["recent_size"] + p["token_entropy_size"]

    def check_chunk_size(self, chunk_size: int) -> None:
        room = self.cache_size - self.params["start_size"]
        if chunk_size > room:
            raise UserError(f"sirllm needs chunk_size <= cache_size - start_size = {room} (a forward call's tokens "
                            f"must fit its cache), got chunk_size={chunk_size}; set e.g. chunk_size=512.")

    def bind(self, model, spec) -> None:
        super().bind(model, spec)
        self._sample: _Sample | None = None

    def new_state(self, layer_idx: int) -> dict:
        if layer_idx == self.spec.first_layer:  # the engine creates this state first for each sample
            self._sample = _Sample()
        return {"layer": layer_idx, "kv": None, "sample": self._sample}

    # -- eviction (once per call, at layer 0; every layer applies the same indices) ----------------------------
    def _evict(self, smp: _Sample, m: int) -> None:
        """Token-entropy eviction before a call of m tokens, then the memory decay."""
        smp.keep = None
        if smp.ent is None:  # the sample's first call: nothing cached
            return
        n, cache = smp.ent.shape[0], self.cache_size
        if n + m > cache:
            start = self.params["start_size"]
            n_ent = self.params["token_entropy_size"] - m
            mask = torch.zeros(n, dtype=torch.bool, device=smp.ent.device)
            if n_ent > 0:
                order = torch.sort(smp.ent, descending=True, stable=True).indices  # ties: lower index first
                mask[order[:n_ent]] = True
            mask[:start] = True
            need = cache - m - int(mask.sum())
            if need > 0:  # the newest tokens not kept yet, scanning down to index 1
                free = torch.nonzero(~mask[1:])[:, 0] + 1
                mask[free[-need:]] = True
            smp.keep = torch.nonzero(mask)[:, 0]
            smp.ent = smp.ent[smp.keep]
        ratio = self.params["decay_ratio"]
        if ratio != 1:
            smp.ent = smp.ent * (ratio if self.params["decay_per"] == "call" else ratio**m)

    def attend(self, state, q, k, v, pos, out=None):
        smp: _Sample = state["sample"]
        m = q.shape[2]
        if state["layer"] == self.spec.first_layer:
            if m > self.cache_size - self.params["start_size"]:
                self.check_chunk_size(m)
            self._evict(smp, m)
        kv: KVBuffer | None = state["kv"]
        if kv is None:
            kv = state["kv"] = KVBuffer(k, capacity=self.cache_size)
        elif smp.keep is not None:  # compact by index: same tokens in every layer, cache order kept
            n = smp.keep.shape[0]
            kv.k[:, :, :n] = kv.k[:, :, smp.keep]
            kv.v[:, :, :n] = kv.v[:, :, smp.keep]
            kv.len = n
        kv.append(k, v)  # un-rotated
        keys, values = kv.view()  # [B, H_kv, T, D]
        T = keys.shape[2]
        stage = Stage(self.rope.rotate_range(q, T - m), self.rope.rotate_range(keys, 0), values,
                      k_start=0, band=(0, INF))  # keys at slots 0..T-1, queries at T-m..T-1
        q_pos = torch.arange(T - m, T, device=q.device)
        out, _ = multi_stage_attention([stage], q_pos=q_pos, scale=self.scale, q_tile=self.q_tile,
                                       fused=self.fattn, out=out)
        return out

    # -- entropies of the call's tokens (after the layer loop) ---------------------------------------------------
    def observe_token_nll(self, states: list, nll: torch.Tensor, nll_own: torch.Tensor) -> None:
        smp: _Sample = states[0]["sample"]
        if self.params["entropy_shift_fix"]:
            vals, rest = nll.double(), nll[1:].double()  # rest: the values the call computed itself
        else:  # the code's list: position j-1's logits at token j-1 scores token j
            own = nll_own.double()
            vals = torch.cat([own.new_full((1,), float("nan")), own[:-1]])
            vals[0] = smp.last_own if smp.last_own is not None else float("nan")
            rest = own  # its max runs over every position of the call, the last one included
            smp.last_own = own[-1]
        call_max = rest.max() if rest.numel() else vals.new_tensor(float("nan"))
        first = vals[0]
        if self.params["first_token"] == "call_max" and not torch.isnan(call_max):
            first = call_max
        elif torch.isnan(first):  # a sample's first token: no predecessor
            first = call_max if not torch.isnan(call_max) else vals.new_tensor(0.0)
        vals = torch.cat([first.view(1), vals[1:]])
        smp.ent = vals if smp.ent is None else torch.cat([smp.ent, vals])

    # -- accounting --------------------------------------------------------------------------------------------
    def attended_keys(self, p: int) -> int:
        return min(p + 1, self.cache_size)

    def memory_model(self, length: int, chunk: int, device: str) -> dict[str, int]:
        """At most cache_size tokens after a call's append (cache_size - m retained + m new); a query tile is
        scored against them."""
        keys = min(length, self.cache_size)
        return {"device_tokens": keys, "host_tokens": 0, "workspace_keys": keys}

    def kv_bytes(self, states: list) -> dict[str, int]:
        return {"device": sum(s["kv"].nbytes() for s in states if s["kv"] is not None), "offloaded": 0}
