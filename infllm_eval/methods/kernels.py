"""Attention kernels shared by the context methods: plain PyTorch, tiled over queries.

All methods reduce to one primitive: a single softmax over the concatenation of several key "stages"
(full: one stage; StreamingLLM / LM-Infinite: local window + initial tokens; InfLLM: local window + retrieved units,
initial tokens and remainder). Each stage may restrict which keys a query sees by a *distance band* on absolute token
positions: query at position p sees key at position s iff lo <= p - s <= hi. Masks are computed per query tile
from positions, so no mask grows with chunk x total length, and the score workspace is bounded by
q_tile x (keys of the stages).

Shapes: q [B, H, L, D]; k, v [B, H_kv, T, D]; H = H_kv * G (GQA handled by grouping queries, never by expanding K/V).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INF = float("inf")


@dataclass
class Stage:
    """One group of keys in the joint softmax."""

    q: torch.Tensor  # [B, H, L, D] queries as rotated for this stage
    k: torch.Tensor  # [B, H_kv, T, D]
    v: torch.Tensor  # [B, H_kv, T, D]
    k_pos: torch.Tensor | None = None  # [T] absolute positions of the keys (needed when a band is set)
    band: tuple[float, float] | None = None  # allowed distances (lo, hi) inclusive; None = all keys visible
    want_scores: bool = False  # return sum over queries of the softmax probability per key, per query head


def _band_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, band: tuple[float, float]) -> torch.Tensor:
    dist = q_pos[:, None] - k_pos[None, :]  # [tq, T]
    lo, hi = band
    ok = dist >= lo
    if hi != INF:
        ok &= dist <= hi
    return ok


def multi_stage_attention(
    stages: list[Stage], q_pos: torch.Tensor, scale: float, q_tile: int = 256
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Joint-softmax attention over `stages`; returns output [B, H, L, D] and, per stage, the summed
    probabilities [B, H, T] (or None). Math is fp32; a query that sees no key at all gets a zero output."""
    q0 = stages[0].q
    B, H, L, D = q0.shape
    H_kv = stages[0].k.shape[1]
    G = H // H_kv
    out = q0.new_empty(B, H, L, D)
    scores_out = [
        torch.zeros(B, H, st.k.shape[2], dtype=torch.float32, device=q0.device) if st.want_scores else None
        for st in stages
    ]
    for s in range(0, L, q_tile):
        e = min(L, s + q_tile)
        tq = e - s
        logits = []
        for st in stages:
            qt = st.q[:, :, s:e].reshape(B, H_kv, G * tq, D)
            lg = torch.matmul(qt.float(), st.k.float().transpose(-1, -2)).mul_(scale)  # [B, H_kv, G*tq, T]
            lg = lg.view(B, H_kv, G, tq, -1)
            if st.band is not None:
                ok = _band_mask(q_pos[s:e], st.k_pos, st.band)
                lg.masked_fill_(~ok, -INF)
            logits.append(lg)
        lg = torch.cat(logits, dim=-1) if len(logits) > 1 else logits[0]
        p = torch.softmax(lg, dim=-1).nan_to_num_(0.0)  # fully masked rows -> 0
        acc = None
        off = 0
        for i, st in enumerate(stages):
            T = st.k.shape[2]
            pi = p[..., off : off + T]
            off += T
            o = torch.matmul(pi.reshape(B, H_kv, G * tq, T), st.v.float())
            acc = o if acc is None else acc.add_(o)
            if scores_out[i] is not None:
                scores_out[i] += pi.sum(dim=3).reshape(B, H, T)
        out[:, :, s:e] = acc.view(B, H_kv, G, tq, D).reshape(B, H, tq, D).to(out.dtype)
    return out, scores_out
