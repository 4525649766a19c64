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
    k_start: int = 0  # absolute position of key 0; keys sit at k_start + arange(T) (used when a band is set)
    band: tuple[float, float] | None = None  # allowed distances (lo, hi) inclusive; None = all keys visible
    want_scores: bool = False  # return sum over queries of the softmax probability per key, per query head


def _visible_range(q0: int, q1: int, k0: int, T: int, band: tuple[float, float]) -> tuple[int, int]:
    """Indices [a, b) of the keys (positions k0..k0+T-1) that some query in positions [q0, q1] may see."""
    lo, hi = band
    a = 0 if hi == INF else max(0, int(q0 - hi) - k0)
    b = min(T, int(q1 - lo) - k0 + 1)
    return a, max(a, b)


def _tile_mask(q0: int, q1: int, k0: int, k1: int, band, device) -> torch.Tensor | None:
    """Allowed-mask [q1-q0, k1-k0] for query positions [q0, q1) and key positions [k0, k1); None if all allowed."""
    lo, hi = band
    if q0 - (k1 - 1) >= lo and (q1 - 1) - k0 <= hi:
        return None
    dist = torch.arange(q0, q1, device=device)[:, None] - torch.arange(k0, k1, device=device)[None, :]
    ok = dist >= lo
    if hi != INF:
        ok &= dist <= hi
    return ok


def _single_stage_sdpa(st: Stage, p0: int, scale: float, q_tile: int) -> torch.Tensor:
    """Fast path (no scores wanted, one stage): torch SDPA per query tile over the visible keys only."""
    import torch.nn.functional as F

    L, T = st.q.shape[2], st.k.shape[2]
    out = torch.empty_like(st.q)
    for s in range(0, L, q_tile):
        e = min(L, s + q_tile)
        a, b = (0, T) if st.band is None else _visible_range(p0 + s, p0 + e - 1, st.k_start, T, st.band)
        mask = None if st.band is None else _tile_mask(p0 + s, p0 + e, st.k_start + a, st.k_start + b, st.band,
                                                        st.q.device)
        out[:, :, s:e] = F.scaled_dot_product_attention(st.q[:, :, s:e], st.k[:, :, a:b], st.v[:, :, a:b],
                                                         attn_mask=mask, scale=scale, enable_gqa=True)
    return out


def multi_stage_attention(
    stages: list[Stage], q_pos: torch.Tensor, scale: float, q_tile: int = 256
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Joint-softmax attention over `stages`; returns output [B, H, L, D] and, per stage, the summed
    probabilities [B, H, T] (or None). Math is fp32. Query positions are contiguous (q_pos[0] + arange(L)) and so
    are each banded stage's key positions; per tile only the keys a band can make visible are computed, and the
    mask is applied only where a tile straddles a band edge. Every query must see at least one key (the methods
    always put the query itself in the first stage)."""
    q0 = stages[0].q
    B, H, L, D = q0.shape
    H_kv = stages[0].k.shape[1]
    G = H // H_kv
    p0 = int(q_pos[0])
    out = q0.new_empty(B, H, L, D)
    scores_out = [
        torch.zeros(B, H, st.k.shape[2], dtype=torch.float32, device=q0.device) if st.want_scores else None
        for st in stages
    ]
    if len(stages) == 1 and not stages[0].want_scores:
        return _single_stage_sdpa(stages[0], p0, scale, q_tile), scores_out
    qs = [st.q.float() * scale for st in stages]
    ks = [st.k.float() for st in stages]
    vs = [st.v.float() for st in stages]
    for s in range(0, L, q_tile):
        e = min(L, s + q_tile)
        tq = e - s
        logits, spans = [], []
        for i, st in enumerate(stages):
            T = st.k.shape[2]
            a, b = (0, T) if st.band is None else _visible_range(p0 + s, p0 + e - 1, st.k_start, T, st.band)
            spans.append((a, b))
            qt = qs[i][:, :, s:e].reshape(B, H_kv, G * tq, D)
            lg = torch.matmul(qt, ks[i][:, :, a:b].transpose(-1, -2)).view(B, H_kv, G, tq, b - a)
            if st.band is not None and b > a:
                ok = _tile_mask(p0 + s, p0 + e, st.k_start + a, st.k_start + b, st.band, q0.device)
                if ok is not None:  # the tile straddles a band edge
                    lg.masked_fill_(~ok, -INF)
            logits.append(lg)
        # one softmax over all stages without concatenating them: shared row max, in-place exp, shared sum
        m = torch.stack([lg.amax(dim=-1) for lg in logits if lg.shape[-1]]).amax(dim=0, keepdim=False)[..., None]
        denom = None
        for lg in logits:
            if lg.shape[-1]:
                lg.sub_(m).exp_()
                rs = lg.sum(dim=-1, keepdim=True)
                denom = rs if denom is None else denom.add_(rs)
        inv = denom.reciprocal_()
        acc = None
        for i, st in enumerate(stages):
            a, b = spans[i]
            if b == a:
                continue
            pi = logits[i].mul_(inv)  # probabilities of this stage's keys [B, H_kv, G, tq, b-a]
            o = torch.matmul(pi.view(B, H_kv, G * tq, b - a), vs[i][:, :, a:b])
            acc = o if acc is None else acc.add_(o)
            if scores_out[i] is not None:
                scores_out[i][:, :, a:b] += pi.sum(dim=3).reshape(B, H, b - a)
        out[:, :, s:e] = acc.view(B, H_kv, G, tq, D).reshape(B, H, tq, D).to(out.dtype)
    return out, scores_out
