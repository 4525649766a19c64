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

import math
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


_EDGE_MASKS: dict[tuple, torch.Tensor | None] = {}


def _edge_mask(q0: int, q1: int, c0: int, c1: int, band, device) -> torch.Tensor | None:
    """The disallowed-mask (~_tile_mask) of an edge slice. It depends only on the tile's shape and on q0 - c0, which
    repeat from tile to tile (the band slides with the queries), so each one is built once and kept."""
    key = (q0 - c0, q1 - q0, c1 - c0, band, str(device))
    if key not in _EDGE_MASKS:
        if len(_EDGE_MASKS) > 4096:  # bound it: odd shapes (last tiles, short prompts) do not pile up
            _EDGE_MASKS.clear()
        ok = _tile_mask(q0 - c0, q1 - c0, 0, c1 - c0, band, device)  # distances are shift-invariant
        _EDGE_MASKS[key] = None if ok is None else ~ok
    return _EDGE_MASKS[key]


def _mask_band_edges(lg: torch.Tensor, q0: int, q1: int, k0: int, k1: int, band) -> None:
    """Set to -inf the logits lg [..., q1-q0, k1-k0] of keys outside their query's band. Only the edge columns are
    touched: keys between positions q1-1-hi and q0-lo are in band for every query of the tile, so the mask is
    applied on at most two slices of < q1-q0 columns each, never on the whole tile."""
    lo, hi = band
    left = k0 if hi == INF else min(k1, max(k0, int(q1 - 1 - hi)))  # [k0, left): too far for some queries
    right = max(left, min(k1, int(q0 - lo) + 1))  # [right, k1): too near (or in the future) for some queries
    for c0, c1 in ((k0, left), (right, k1)):
        if c1 > c0:
            bad = _edge_mask(q0, q1, c0, c1, band, lg.device)
            if bad is not None:
                lg[..., c0 - k0 : c1 - k0].masked_fill_(bad, -INF)


_SCRATCH: dict[tuple, torch.Tensor] = {}


def _scratch(slot, n: int, device) -> torch.Tensor:
    """A flat fp32 buffer of >= n elements for `slot` (a stage's logits tile, or its K / V copies for
    `_split_kv`), kept across calls and grown (x1.25), never shrunk. The logits tile is the largest temporary of
    the explicit path and its width changes while a method's memory fills; one long-lived buffer per use keeps
    those sizes from fragmenting the heap."""
    key = (torch.device(device), slot)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.empty(max(n, int(1.25 * buf.numel()) if buf is not None else n), dtype=torch.float32,
                          device=device)
        _SCRATCH[key] = buf
    return buf


def _row_split(n_batch: int, rows: int, device) -> int:
    """How many parts to cut each of the explicit path's `n_batch` matmul problems into, by query rows, so that
    their number is a multiple of the CPU threads. torch's CPU bmm hands whole problems to its threads: 3 KV heads
    (SmolLM2) on 2 threads leave one thread idle a third of the time (QK^T at 2112 keys measured here at ~100
    GFLOP/s with 3 problems, ~130 with 2 or 4). 1 (no split) on other devices, or when a part would have fewer
    than 32 rows (decoding)."""
    if device.type != "cpu":
        return 1
    threads = torch.get_num_threads()
    s = threads // math.gcd(n_batch, threads)
    return s if s > 1 and rows % s == 0 and rows // s >= 32 else 1


def _split_kv(x: torch.Tensor, s: int, slot) -> torch.Tensor:
    """x [B, H_kv, T, D] as fp32 [B, H_kv, s, T, D]: s copies of each head, so that a key span [a, b) of all s
    copies is one bmm operand [B * H_kv * s, b - a, D] without a copy per tile (the copies sit in a kept buffer)."""
    B, H_kv, T, D = x.shape
    if s == 1:
        return x.float()[:, :, None]
    buf = _scratch(slot, B * H_kv * s * T * D, x.device)[: B * H_kv * s * T * D].view(B, H_kv, s, T, D)
    return buf.copy_(x[:, :, None])


SDPA_Q_TILE = 256  # SDPA tiles internally; the outer tile only bounds the band mask and skips invisible keys


def _single_stage_sdpa(st: Stage, p0: int, scale: float, out: torch.Tensor) -> torch.Tensor:
    """Fast path (no scores wanted, one stage): torch SDPA per query tile over the visible keys only."""
    import torch.nn.functional as F

    L, T = st.q.shape[2], st.k.shape[2]
    q_tile = SDPA_Q_TILE
    for s in range(0, L, q_tile):
        e = min(L, s + q_tile)
        a, b = (0, T) if st.band is None else _visible_range(p0 + s, p0 + e - 1, st.k_start, T, st.band)
        mask = None if st.band is None else _tile_mask(p0 + s, p0 + e, st.k_start + a, st.k_start + b, st.band,
                                                        st.q.device)
        out[:, :, s:e] = F.scaled_dot_product_attention(st.q[:, :, s:e], st.k[:, :, a:b], st.v[:, :, a:b],
                                                         attn_mask=mask, scale=scale, enable_gqa=True)
    return out


def fused_backend(device: torch.device, dtype: torch.dtype) -> str | None:
    """The fused kernel that unmasked stages use on this device and dtype (recorded in provenance), or None.

    - `cpu-flash`: torch's CPU flash kernel (fp32 / bf16), which returns the row log-sum-exp.
    - `flash-attn`: `flash_attn_func(..., return_attn_probs=True)` on CUDA in fp16 / bf16 when the optional `gpu`
      extra is installed; it returns the log-sum-exp and handles GQA itself.
    - `sdpa-efficient`: torch's memory-efficient CUDA kernel with `compute_log_sumexp` otherwise (any float dtype).
    """
    if device.type == "cpu":
        ok = dtype in (torch.float32, torch.bfloat16) and hasattr(torch.ops.aten,
                                                                 "_scaled_dot_product_flash_attention_for_cpu")
        return "cpu-flash" if ok else None
    if device.type == "cuda":
        if dtype in (torch.float16, torch.bfloat16) and _flash_attn() is not None:
            return "flash-attn"
        return "sdpa-efficient"
    return None


def _flash_attn():
    """flash_attn.flash_attn_func, or None where the package is not installed (imported once)."""
    global _FLASH
    if _FLASH is None:
        try:
            from flash_attn import flash_attn_func

            _FLASH = flash_attn_func
        except ImportError:
            _FLASH = False
    return _FLASH or None


def _efficient_attention(q, k, v, scale: float):
    """torch's memory-efficient CUDA kernel with its log-sum-exp: (output, lse padded along the query axis)."""
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, scale=scale)[:2]


_FLASH = None


def _fused_stage(st: Stage, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Unmasked stage through the fused kernel: (output [B, H, L, D] fp32, log-sum-exp [B, H, L] fp32), or None
    when no fused kernel takes these inputs (the stage then runs on the explicit path).
    The G query heads of a KV group share its keys, so (except for flash-attn, which does GQA itself) they are
    folded into the query axis: no K/V expansion."""
    if st.band is not None or st.k.shape[2] == 0:
        return None
    backend = fused_backend(st.q.device, st.q.dtype)
    B, H, L, D = st.q.shape
    H_kv = st.k.shape[1]
    G = H // H_kv
    if backend == "flash-attn":
        o, lse, _ = _flash_attn()(st.q.transpose(1, 2), st.k.transpose(1, 2), st.v.transpose(1, 2),
                                  softmax_scale=scale, causal=False, return_attn_probs=True)
        return o.transpose(1, 2).float(), lse.float()
    q = st.q.reshape(B, H_kv, G * L, D)
    if backend == "cpu-flash":
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, st.k, st.v, scale=scale)[:2]
    elif backend == "sdpa-efficient":
        try:
            o, lse = _efficient_attention(q, st.k, st.v, scale)
        except RuntimeError:  # e.g. a head_dim or GPU the kernel does not support
            return None
        lse = lse[..., : G * L]  # the kernel pads the query axis of the log-sum-exp
    else:
        return None
    return o.float().reshape(B, H, L, D), lse.float().reshape(B, H, L)


def multi_stage_attention(
    stages: list[Stage], q_pos: torch.Tensor, scale: float, q_tile: int = 64, fused: bool = True,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Joint-softmax attention over `stages`; returns output [B, H, L, D] and, per stage, the summed
    probabilities [B, H, T] (or None). Math is fp32. Query positions are contiguous (q_pos[0] + arange(L)) and so
    are each banded stage's key positions; per tile only the keys a band can make visible are computed, and the
    mask is applied only where a tile straddles a band edge. Every query must see at least one key (the methods
    always put the query itself in the first stage).

    Stages after the first without a band (InfLLM's retrieved units + initial tokens) go through a fused kernel
    (`fused_backend`: CPU flash, flash-attn or SDPA's memory-efficient kernel on CUDA) and join the softmax through
    their log-sum-exp (their scores, when wanted, are recomputed from the joint log-sum-exp); the others are
    computed per query tile (a stage in which every query of the tile sees a key takes torch's row softmax in place
    and joins through its log-sum-exp too), with the joint normalisation deferred to the [tile, D] output.
    `fused=False` (a method's `fattn: false`) runs every stage on the explicit tiled path, a single stage without
    scores included. `out` (any strides, e.g. a view of the engine's buffer) receives the output when
    given."""
    q0 = stages[0].q
    B, H, L, D = q0.shape
    H_kv = stages[0].k.shape[1]
    G = H // H_kv
    p0 = int(q_pos[0])
    scores_out = [
        torch.zeros(B, H, st.k.shape[2], dtype=torch.float32, device=q0.device) if st.want_scores else None
        for st in stages
    ]
    out = q0.new_empty(B, H, L, D) if out is None else out
    if fused and len(stages) == 1 and not stages[0].want_scores:
        return _single_stage_sdpa(stages[0], p0, scale, out), scores_out
    joined, o_f, lse_f = [], None, None  # stages that went through the fused kernel
    for i in range(1, len(stages)):  # combine the fused stages: lse = logaddexp, output weighted by exp(lse_i - lse)
        r = _fused_stage(stages[i], scale) if fused else None
        if r is None:
            continue
        joined.append(i)
        o_i, lse_i = r
        if o_f is None:
            o_f, lse_f = o_i, lse_i
        else:
            new = torch.logaddexp(lse_f, lse_i)
            o_f = o_f * (lse_f - new).exp_()[..., None] + o_i * (lse_i - new).exp_()[..., None]
            lse_f = new
    rest = [i for i in range(len(stages)) if i not in joined]
    qs = {i: stages[i].q.float() * scale for i in rest}
    n_tile = B * H_kv * G * min(q_tile, L)
    split = _row_split(B * H_kv, G * min(q_tile, L), q0.device)
    ks = {i: _split_kv(stages[i].k, split, ("k", i)) for i in rest}  # [B, H_kv, split, T, D]
    vs = {i: _split_kv(stages[i].v, split, ("v", i)) for i in rest}
    bufs = {i: _scratch(i, n_tile * stages[i].k.shape[2], q0.device) for i in rest}  # logits, reused by every tile
    for s in range(0, L, q_tile):
        e = min(L, s + q_tile)
        tq = e - s
        sp = split if (G * tq) % split == 0 else 1  # a short last tile may not divide
        nb, rows = B * H_kv * sp, G * tq // sp  # bmm problems: each KV head's query rows cut into sp parts
        logits, spans = {}, {}
        for i in rest:
            st = stages[i]
            T = st.k.shape[2]
            a, b = (0, T) if st.band is None else _visible_range(p0 + s, p0 + e - 1, st.k_start, T, st.band)
            spans[i] = (a, b)
            if b == a:
                continue
            qt = qs[i][:, :, s:e].reshape(nb, rows, D)
            lg = bufs[i][: B * H_kv * G * tq * (b - a)].view(nb, rows, b - a)
            torch.bmm(qt, ks[i][:, :, :sp, a:b].reshape(nb, b - a, D).transpose(-1, -2), out=lg)
            lg = lg.view(B, H_kv, G, tq, b - a)
            if st.band is not None:
                _mask_band_edges(lg, p0 + s, p0 + e, st.k_start + a, st.k_start + b, st.band)
            logits[i] = lg
        # one softmax over all stages without concatenating them. A stage whose every query sees a key of it
        # takes torch's fused row softmax in place (one kernel, rows in cache) and joins the others through its
        # log-sum-exp, lse_i = max_i - log(max of its probabilities); a stage with a fully masked row (e.g. the
        # remainder for queries whose window still covers it) is exponentiated against the shared max m instead
        maxes = {i: lg.amax(dim=-1, keepdim=True) for i, lg in logits.items()}  # [B, H_kv, G, tq, 1]
        m = torch.stack(list(maxes.values())).amax(dim=0)
        lse_t = None
        if o_f is not None:
            lse_t = lse_f[:, :, s:e].reshape(B, H_kv, G, tq, 1)
            m = torch.maximum(m, lse_t)
        denom = acc = None
        weight = {}  # per stage: row factor from its probabilities to exp(logit - m), or None (already so)
        for i, lg in logits.items():
            a, b = spans[i]
            if torch.isneginf(maxes[i]).any():
                lg.sub_(m).exp_()  # unnormalised probabilities against the shared max
                rs, weight[i] = lg.sum(dim=-1, keepdim=True), None
            else:
                torch.ops.aten._softmax.out(lg, -1, False, out=lg)
                rs = weight[i] = (maxes[i] - lg.amax(dim=-1, keepdim=True).log_() - m).exp_()  # exp(lse_i - m)
            denom = rs.clone() if denom is None else denom.add_(rs)
            o = torch.bmm(lg.view(nb, rows, b - a), vs[i][:, :, :sp, a:b].reshape(nb, b - a, D))
            o = o.view(B, H_kv, G, tq, D)
            if weight[i] is not None:
                o.mul_(weight[i])
            acc = o if acc is None else acc.add_(o)
        if o_f is not None:
            w = (lse_t - m).exp_()  # weight of the fused stages [B, H_kv, G, tq, 1]
            denom = denom.add_(w)
            acc = acc.add_(o_f[:, :, s:e].reshape(B, H_kv, G, tq, D) * w)
        for i in joined:
            if scores_out[i] is not None:  # e.g. lru-s credit: probabilities from the joint log-sum-exp
                st = stages[i]
                lse_all = m + denom.log()  # [B, H_kv, G, tq, 1]
                qt = (st.q[:, :, s:e].float() * scale).reshape(B, H_kv, G * tq, D)
                p = torch.matmul(qt, st.k.float().transpose(-1, -2)).view(B, H_kv, G, tq, -1).sub_(lse_all).exp_()
                scores_out[i] += p.sum(dim=3).reshape(B, H, -1)
        inv = denom.reciprocal_()  # [B, H_kv, G, tq, 1]
        for i, lg in logits.items():
            if scores_out[i] is not None:  # sum over the tile's queries of the normalised probabilities
                a, b = spans[i]
                f = inv if weight[i] is None else weight[i] * inv
                sc = torch.matmul(f.transpose(-1, -2), lg)  # [B, H_kv, G, 1, b-a]
                scores_out[i][:, :, a:b] += sc.view(B, H, b - a)
        out[:, :, s:e] = acc.mul_(inv).reshape(B, H, tq, D).to(out.dtype)
    return out, scores_out
