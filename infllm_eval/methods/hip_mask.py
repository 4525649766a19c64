"""HiP v1.0 mask estimation (`hip_attention_mask` + `masking_iteration` + `safe_indices` of DeepAuto-AI/hip-attention
@ fea42c77, `src/hip_attn/v1_0/`), as a deterministic tensor replay vectorised over (query head, query block, grid).

One *row* is one query head h, one query block b of the call and one source grid g (`ksrc_stride` > 1 only in
calls of <= 32 queries). A row keeps its node locations as fp32 fractions of [0, 1) in `MK` slots (the kernel's
MASK), a candidate buffer of `TM` slots (TMASK) and its current width w. Each iteration doubles w (capped at the
block's T_b), expands every kept node into its children at the new resolution, scores each child by the max dot
product between the block's scoring queries and the bk keys at the child's first key, and keeps the k_new best in
order. The arithmetic is the kernel's: fp32 locations, float64 products truncated to int64 (so a node's parent index
comes out one lower about half the time: floor(fl32(i/n) * n) = i - 1), the child-slot offset of the kernel (see
`pixel_slot_quirk`), the candidate capacity (next_pow2(TM), half of it after the first iteration), and stale slot
contents. Departures: scoring in fp32 (the kernel: fp16 after max-abs normalisation), deterministic tie-breaks
(documented in `hip.py`). Rows whose width never grows (T_b <= w_start / scale_up) keep their initial nodes, which
cover [0, T_b): dense (the kernel leaves its ws/ks outputs unwritten there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def cdiv(a, b):
    return -(-a // b)


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@dataclass
class MaskConfig:
    """Per-call constants (after the original's clamps and the lower-resolution halving)."""

    mask_k: int  # tokens (halved when estimating at lower resolution)
    w_start: int
    n_patches: int
    scale_up: float
    bq: int  # block_size_q, clamped to next_pow2(T_DST)
    bk: int  # block_size_k, clamped to next_pow2(T_SRC)
    reduce_stride: int
    sliding_window_size: int
    grid: int  # GRID_SRC_STRIDE = GRID_K_STRIDE
    sparq_hid: int | None  # None = SparQ off
    lower_resolution: int  # 1 = off
    pixel_slot_quirk: bool


def _round(x: torch.Tensor) -> torch.Tensor:
    """libdevice round: half away from zero (x >= 0 here)."""
    return torch.floor(x + 0.5)


def estimate(q: torch.Tensor, keys: torch.Tensor, cfg: MaskConfig, tile_floats: int = 1 << 25
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [H, L, D] (rotated, the sparse queries of the call), keys [H_kv, T, D] (rotated, whole cache) ->
    (block starts [H, nb, KK] int64, count [H, nb] int64): row (h, b) attends to the blocks
    [start, start + bk) of its first `count` entries. Query blocks are independent: they are estimated in tiles
    whose score table (`_max_scores`, [H, blocks, T]) stays within `tile_floats`."""
    H, L, D = q.shape
    T = keys.shape[1]
    nb = cdiv(L, cfg.bq)
    nqs = len(range(0, cfg.bq, cfg.reduce_stride))
    step = max(1, tile_floats // (H * T * max(nqs, 2)))
    parts = [_estimate(q, keys, cfg, b0, min(nb, b0 + step)) for b0 in range(0, nb, step)]
    return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)


def _estimate(q, keys, cfg: MaskConfig, b0: int, b1: int):
    """`estimate` for query blocks [b0, b1)."""
    H, L, D = q.shape
    Hkv, T, _ = keys.shape
    bq, bk, G = cfg.bq, cfg.bk, cfg.grid
    dev = q.device
    blocks = torch.arange(b0, b1, device=dev)
    nb = b1 - b0  # rows below index blocks relative to b0
    tsrc = torch.clamp(T - L + blocks * bq + max(bq, bk), max=T)  # [nb] keys visible to the block's last query
    w_curr = round(cfg.w_start / cfg.scale_up)
    ws = torch.clamp(tsrc, 0, w_curr)
    bws = torch.ceil(ws.float() / bk)  # fp32, as torch computes it
    ks = torch.ceil(bws / G).long()
    MK = cdiv(cdiv(cfg.mask_k, bk), G)
    TM = MK * math.ceil(cfg.scale_up)
    NP = cdiv(cdiv(cfg.n_patches, bk), G)
    max_dup = next_pow2(math.ceil(cfg.scale_up))
    # rows (h, b, g), flattened in that order
    locs = (torch.arange(MK, device=dev, dtype=torch.float32)[None, None] / ks.float()[:, None, None]
            + torch.arange(G, device=dev, dtype=torch.float32)[None, :, None] * (1 / bws)[:, None, None])
    R = H * nb * G
    locs = torch.cat([locs.expand(H, nb, G, MK).reshape(R, MK), locs.new_zeros(R, 1)], 1)  # + a dump column
    tmask = locs.new_zeros(R, TM + 1)
    row_hb = torch.arange(H * nb, device=dev).repeat_interleave(G)  # [R] index into [H * nb]
    t_src = tsrc.repeat_interleave(G).repeat(H)
    w_old = ws.repeat_interleave(G).repeat(H)
    k_old = ks.repeat_interleave(G).repeat(H)
    ws_out, ks_out = w_old.clone(), k_old.clone()

    # scoring queries: every reduce_stride-th query of the block; per (head, block) and key, the max over them of
    # q.k where the pair is not masked (causal, window area): the table the iterations read candidates from
    rel = torch.arange(0, bq, cfg.reduce_stride, device=dev)
    t_q = blocks[:, None] * bq + rel[None]  # [nb, nqs] index in the call
    q_ok = t_q < L
    qs = q[:, t_q.clamp(max=L - 1)] * q_ok[None, :, :, None]  # [H, nb, nqs, D]
    c_sw = max(0, cfg.sliding_window_size - bq - bk)
    limit = torch.where(q_ok, t_q + (T - L) - c_sw, -1)  # [nb, nqs]: the last key each scoring query scores
    Tt = int(tsrc.max())  # keys at or past the tile's last t_src are never scored (causal)
    dim_sets = [None]
    if cfg.sparq_hid is not None:  # top-|q| dims of the block's queries (sum of |q| over the block)
        qa = torch.zeros(H, b1 * bq, D, device=dev, dtype=q.dtype)
        qa[:, : min(L, b1 * bq)] = q[:, : b1 * bq].abs()
        qa = qa[:, b0 * bq :].view(H, nb, bq, D).sum(2)
        order = torch.sort(qa, dim=-1, descending=True, stable=True).indices
        hid = cfg.sparq_hid
        dim_sets = []
        for n in (hid // 2 if hid > 16 else hid, hid):  # the first iteration uses half the dims
            m = torch.zeros(H, nb, D, device=dev, dtype=q.dtype)
            m.scatter_(-1, order[..., :n], 1.0)
            dim_sets.append(m)
    tables = [_max_scores(qs if m is None else qs * m[:, :, None], keys[:, :Tt], limit) for m in dim_sets]

    n_iter, w = 0, w_curr
    while w < T:
        w = round(w * cfg.scale_up)
        n_iter += 1
    for it in range(n_iter):
        w_new = torch.minimum(_round(w_old.double() * cfg.scale_up).long(), t_src)
        act = (w_old != w_new).nonzero().squeeze(1)
        if act.numel() == 0:
            continue
        wo, wn, ts, ko = w_old[act], w_new[act], t_src[act], k_old[act]
        b_old, b_new = cdiv(wo, bk).double(), cdiv(wn, bk).double()
        k_new = torch.clamp((torch.clamp(MK / cdiv(ts, bk).double(), max=1.0) * b_new).long(), min=NP)
        k_new = torch.minimum(cdiv(ts, bk * G), k_new)
        lv = locs[act, :MK]
        kmask = (torch.arange(MK, device=dev)[None] < ko[:, None]) & (lv < 1.0)
        a = (lv.double() * b_old[:, None]).long()
        ratio = (b_new / b_old)[:, None]
        start = (a.double() * ratio).long()
        dup = ((a + 1).double() * ratio).long().sub_(start).mul_(kmask)
        incl = dup.cumsum(1)
        npix = incl[:, -1]
        base = incl - incl[:, :1] if cfg.pixel_slot_quirk else incl - dup
        topk = (k_new < npix) | (cfg.reduce_stride > 1)
        dump = torch.full_like(base, MK)
        # copy path (no scoring): children straight into the node slots (`_idx <= dup`, as the kernel)
        for c in range(max_dup if bool((~topk).any()) else 0):
            slot = base + c
            ok = (~topk[:, None]) & kmask & (c <= dup) & (slot < MK) & (slot < npix[:, None])
            val = ((start + c).double() / b_new[:, None]).float()
            sub = locs[act]
            sub.scatter_(1, torch.where(ok, slot, dump), val)
            locs[act] = sub
        tk = topk.nonzero().squeeze(1)
        if tk.numel():
            rows = act[tk]
            tm = tmask[rows]
            dump_t = torch.full_like(base[tk], TM)
            for c in range(max_dup):
                slot = base[tk] + c
                ok = kmask[tk] & (c < dup[tk]) & (slot < TM)
                val = ((start[tk] + c).double() / b_new[tk, None]).float()
                tm.scatter_(1, torch.where(ok, slot, dump_t), val)
            tmask[rows] = tm
            cap = next_pow2(TM) if it == 0 else next_pow2(TM) // 2
            C = min(cap, TM)
            ncand = torch.clamp(npix[tk], max=C)
            cand = tm[:, :C]
            score = _score(cand, ts[tk], row_hb[rows], bk, tables[0 if it == 0 or len(tables) == 1 else 1])
            eligible = torch.arange(C, device=dev)[None] < ncand[:, None]
            kn = k_new[tk]
            ranked = torch.sort(score.masked_fill(~eligible, -math.inf), dim=1, descending=True).values
            kth = ranked.gather(1, (torch.minimum(kn, ncand).clamp(min=1) - 1)[:, None])
            keep = eligible & (score >= kth)  # -inf >= -inf: unscorable candidates fill what is left
            rank = keep.long().cumsum(1)
            keep &= rank <= kn[:, None]  # threshold overfill: lower index first
            sub = locs[rows]
            sub.scatter_(1, torch.where(keep, rank - 1, torch.full_like(rank, MK)), cand)
            locs[rows] = sub
        k_fin = torch.minimum(k_new, npix)
        w_old[act], k_old[act] = wn, k_fin
        fin = torch.minimum(_round(wn.double() * cfg.scale_up).long(), ts) == wn
        ws_out[act] = torch.where(fin, wn, ws_out[act])
        ks_out[act] = torch.where(fin, k_fin, ks_out[act])

    # merge grids, lower resolution, collision-free block indices (safe_indices, "biased")
    m = locs[:, :MK].reshape(H, nb, G * MK)
    if G > 1:
        m = m.sort(dim=-1).values
    if cfg.lower_resolution > 1:
        m = m.repeat_interleave(cfg.lower_resolution, dim=-1)
    count = ks_out.view(H, nb, G).sum(-1) * cfg.lower_resolution
    wsb = ws_out.view(H, nb, G)[..., 0]
    col = torch.ceil(m * wsb.float()[..., None] / bk).long()
    i = torch.arange(col.shape[-1], device=dev)
    col = torch.cummax(col - i, dim=-1).values + i
    return col * bk, count


def _max_scores(qs: torch.Tensor, keys: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """qs [H, nb, nqs, D], keys [H_kv, T, D], limit [nb, nqs] -> [H * nb, T]: per (head, block) and key j, the max
    over scoring queries i with j <= limit_i of q_i.k_j; -inf where none."""
    H, nb, nqs, D = qs.shape
    Hkv, T, _ = keys.shape
    dots = torch.matmul(qs.reshape(Hkv, (H // Hkv) * nb * nqs, D), keys.transpose(1, 2))  # GQA: heads share keys
    dots = dots.view(H, nb, nqs, T)
    ok_q = limit >= 0  # queries past the call (a short last block) score nothing
    if not bool(ok_q.all()):
        dots.masked_fill_(~ok_q[None, :, :, None], -math.inf)
    out = dots.amax(dim=2)  # [H, nb, T]: right where every query of the block may score the key
    # the limits of a block's queries span < bq keys: recompute those edge columns with the per-query mask
    lo = torch.where(ok_q, limit, limit.max() + T).amin(1)  # [nb]
    hi = limit.amax(1)
    width = max(1, int((hi - lo).max()))
    cols = (lo[:, None] + 1 + torch.arange(width, device=qs.device)).clamp(0, T - 1)  # [nb, width]
    edge = dots.gather(3, cols[None, :, None].expand(H, nb, nqs, width))
    edge.masked_fill_(cols[:, None] > limit[:, :, None], -math.inf)
    out.scatter_(2, cols[None].expand(H, nb, width), edge.amax(dim=2))
    out.masked_fill_(torch.arange(T, device=qs.device) > hi[:, None], -math.inf)
    return out.view(H * nb, T)


def _score(cand: torch.Tensor, ts: torch.Tensor, hb: torch.Tensor, bk: int, table: torch.Tensor) -> torch.Tensor:
    """Max over scoring queries x the bk keys at each candidate's first key of q.k (from `table`, [H * nb, T']);
    -inf where every pair is masked. cand [n, C] fp32 locations, ts [n] the rows' T_b, hb [n] their table rows."""
    T = table.shape[1]
    r = (cand.double() * ts[:, None].double()).long()
    r = torch.minimum(torch.clamp(r, min=0), ts[:, None] - 1)
    r = torch.div(r, bk, rounding_mode="floor") * bk
    flat, base = table.view(-1), (hb * T)[:, None]
    best = None
    for kk in range(bk):
        j = r + kk
        v = flat[base + j.clamp(max=T - 1)].masked_fill_(j >= T, -math.inf)  # keys past T' are never scored
        best = v if best is None else torch.maximum(best, v)
    return best
