"""What SnapKV and H2O (kvpress's `SnapKVPress`, `ObservedAttentionPress`) share: kvpress's `ScorerPress` in
harness terms. Spec: shared/reference/methods-wave2.md section 5; source NVIDIA/kvpress @ 8bb29b9
(`kvpress/presses/scorer_press.py: ScorerPress.compress`, `base_press.py: forward_hook`).

1. The context (prompt[:-1]) is prefilled with full causal attention, keys rotated once at their true positions; a
   subclass observes what its score needs on the way (`observe`).
2. At `end_context` (base.py: after the context, before the last prompt token), per layer, the subclass scores every
   context key per KV head (`score`: [H_kv, n]) and each KV head keeps its own top `n_keep(n)` keys (score
   descending, ties: lower position first; kvpress's CUDA top-k leaves ties unspecified); the rest are dropped.
3. Later tokens (the last prompt token, then decoding) are appended and attend to the kept keys plus themselves at
   true positions (kvpress's pipeline continues `position_ids` from the context length): the kept keys are stored
   in one [B, H_kv, kept, D] buffer whose slots are read as positions n - kept .. n - 1 (all before every later
   query, so all visible), and later tokens as their own positions n, n + 1, ...

How many keys a head keeps: `compression_ratio` r (kvpress's knob): int(n * (1 - r)), kvpress's formula with its
float rounding (e.g. int(1000 * (1 - 0.9)) = 99); or `kept_tokens` K [inferred, not in kvpress: a fixed budget, so
one preset keeps the same span at every context length, as the other methods' presets do]: min(K, n). Exactly one of
the two is set. r = 0 (or K >= n) keeps everything: full attention.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from infllm_eval.errors import UserError
from infllm_eval.methods.base import ContextMethod, KVBuffer
from infllm_eval.methods.kernels import INF, Stage, multi_stage_attention


class ScorerPress(ContextMethod):
    """Base of the one-time context presses; subclasses define `observe`, `score` and `name`."""

    position_scheme = "true (kept context keys per KV head + every later token)"
    param_names: ClassVar[tuple[str, ...]] = ("compression_ratio", "kept_tokens", "base", "distance_scale")
    wants_scores: ClassVar[bool] = False  # observe() gets each context call's key probabilities (explicit path)
    #: set to a list to record (layer, kept indices [H_kv, kept]) at each compression (tests)
    kept: list | None = None

    def validate(self) -> None:
        super().validate()
        r, k = self.params["compression_ratio"], self.params["kept_tokens"]
        if (r is None) == (k is None):
            raise UserError(f"method.params must set exactly one of compression_ratio and kept_tokens (the other "
                            f"null), got compression_ratio={r!r}, kept_tokens={k!r}.")
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1):
            raise UserError(f"method.params.compression_ratio must be a number in [0, 1) (the fraction of the "
                            f"context dropped), got {r!r}.")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k <= 0):
            raise UserError(f"method.params.kept_tokens must be a positive integer, got {k!r}.")

    def n_keep(self, n: int) -> int:
        """Context keys each KV head keeps out of n."""
        r, k = self.params["compression_ratio"], self.params["kept_tokens"]
        return min(k, n) if k is not None else int(n * (1 - r))

    # -- per call ------------------------------------------------------------------------------------------------
    def new_state(self, layer_idx: int) -> dict:
        # kv: rotated K / V; offset: the position of slot 0 (n - kept after compression); obs: what score() reads
        return {"layer": layer_idx, "kv": None, "offset": 0, "compressed": False, "obs": None}

    def attend(self, state, q, k, v, pos, out=None):
        p0 = int(pos[0])  # positions are contiguous
        q = self.rope.rotate_range(q, p0)
        k = self.rope.rotate_range(k, p0)
        if state["kv"] is None:
            state["kv"] = KVBuffer(k, capacity=max(1024, k.shape[2]))
        buf: KVBuffer = state["kv"]
        buf.append(k, v)
        keys, values = buf.view()
        observing = not state["compressed"]
        stage = Stage(q, keys, values, k_start=state["offset"], band=(0, INF),
                      want_scores=observing and self.wants_scores)
        out, scores = multi_stage_attention([stage], q_pos=pos, scale=self.scale, q_tile=self.q_tile,
                                            fused=self.fattn, out=out)
        if observing:
            self.observe(state, q, scores[0])
        return out

    def observe(self, state: dict, q: torch.Tensor, probs: torch.Tensor | None) -> None:
        """A context call: q [B, H, L, D] rotated; probs [B, H, T] its queries' attention per key summed over them
        (None unless `wants_scores`). Keeps in state["obs"] what `score` needs."""
        raise NotImplementedError

    def score(self, state: dict, n: int) -> torch.Tensor | None:
        """Scores [H_kv, n] (fp32) of the n context keys, higher = kept; None = keep everything."""
        raise NotImplementedError

    # -- the compression -----------------------------------------------------------------------------------------
    def end_context(self, states: list) -> None:
        for state in states:
            self._compress(state)

    def _compress(self, state: dict) -> None:
        buf: KVBuffer | None = state["kv"]
        n = 0 if buf is None else buf.len
        self.context_len = n
        scores = self.score(state, n) if 0 < self.n_keep(n) < n else None
        state["compressed"], state["obs"] = True, None
        if scores is None:
            return
        keep = self.n_keep(n)
        idx = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :keep].sort(dim=-1).values
        if self.kept is not None:
            self.kept.append((state["layer"], idx.cpu()))
        keys, values = buf.view()  # [B, H_kv, n, D]
        gather = idx[None, :, :, None].expand(keys.shape[0], -1, -1, keys.shape[3])
        new = KVBuffer(keys, capacity=keep + 256)
        new.append(keys.gather(2, gather), values.gather(2, gather))
        state["kv"], state["offset"] = new, n - keep  # the old buffer goes: its memory is freed

    # -- accounting ----------------------------------------------------------------------------------------------
    context_len: int | None = None  # the last sample's context length (set at end_context)

    def attended_keys(self, p: int) -> int:
        """Context queries attend causally; after the last compression, kept + the later tokens."""
        n = self.context_len
        return p + 1 if n is None or p < n else self.n_keep(n) + p - n + 1

    def memory_model(self, length: int, chunk: int, device: str) -> dict[str, int]:
        """The whole context is held until the compression (the peak: its score workspace, [H, window or chunk,
        context] for SnapKV / H2O, is bounded by full attention's); a query tile is scored against all of it."""
        return {"device_tokens": length, "host_tokens": 0, "workspace_keys": length}
