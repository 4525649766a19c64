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


def _causal_flash(st: Stage, p0: int, scale: float, out: torch.Tensor) -> torch.Tensor | None:
    """Causal attention over every earlier key (band (0, inf), keys at positions 0..p0+L-1: full attention) on
    torch's CPU flash kernel, with no mask at all: the keys before the call (every query sees them all) in one call
    with the G query heads of a KV group folded into the query axis, the call's own keys in one causal call per
    group member (square, so the kernel's top-left causal alignment is the right one, and it skips the blocks above
    the diagonal), the two joined by their log-sum-exp. None where this does not apply (other bands or backends).
    Masks per query tile ([tile, keys] bools, which the kernel turns into an additive float mask every call) cost
    as much memory traffic as the scores at long contexts: this path builds none."""
    B, H, L, D = st.q.shape
    H_kv, T = st.k.shape[1], st.k.shape[2]
    past = T - L
    if st.band != (0, INF) or st.k_start != 0 or past != p0 or fused_backend(st.q.device, st.q.dtype) != "cpu-flash":
        return None
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    G = H // H_kv
    q = st.q.reshape(B, H_kv, G, L, D)
    k_own, v_own = st.k[:, :, past:], st.v[:, :, past:]
    own = [flash(q[:, :, g], k_own, v_own, is_causal=True, scale=scale)[:2] for g in range(G)]
    o = torch.stack([x[0] for x in own], dim=2).float()  # [B, H_kv, G, L, D]
    if past == 0:
        out.copy_(o.view(B, H, L, D))
        return out
    lse = torch.stack([x[1] for x in own], dim=2).float()  # [B, H_kv, G, L]
    o_past, lse_past = flash(q.reshape(B, H_kv, G * L, D), st.k[:, :, :past], st.v[:, :, :past], scale=scale)[:2]
    o_past, lse_past = o_past.float().view(B, H_kv, G, L, D), lse_past.float().view(B, H_kv, G, L)
    joint = torch.logaddexp(lse, lse_past)
    o.mul_(torch.exp(lse - joint)[..., None]).add_(o_past.mul_(torch.exp(lse_past - joint)[..., None]))
    out.copy_(o.view(B, H, L, D))
    return out


def _single_stage_sdpa(st: Stage, p0: int, scale: float, out: torch.Tensor) -> torch.Tensor:
    """Fast path (no scores wanted, one stage): full attention on CPU through `_causal_flash`, else torch SDPA per
    query tile over the visible keys only."""
    import torch.nn.functional as F

    if _causal_flash(st, p0, scale, out) is not None:
        return out
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
    stages: list[Stage], q_pos: torch.Tensor, scale: float, q_tile: int, fused: bool = True,
    out: torch.Tensor | None = None, softcap: float | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """One softmax over the keys of all `stages`: output [B, H, L, D] (into `out`, any strides, when given) and,
    per stage, its keys' probabilities summed over the queries [B, H, T] (None unless it wants scores). Math is
    fp32. Query positions are contiguous (q_pos[0] + arange(L)), as are a banded stage's key positions; every
    query sees at least one key (the methods put the query itself in the first stage). Steps:
    1. `_fused_stages`: the stages after the first without a band (InfLLM's retrieved units + initial tokens)
       through a fused kernel, joined into one (output, log-sum-exp); not with `fused=False` (`fattn: false`);
    2. per query tile, `_Explicit.logits`: the other stages' logits over the keys a band lets the tile see;
    3. `_join_softmax`: numerator (times V) and denominator of the joint softmax, stages joined by log-sum-exp;
    4. the probabilities per key of the stages that want them (InfLLM's representative tokens, lru-s credit);
    5. the tile's output: numerator / denominator.
    `softcap` (Gemma 2's attention logit soft-capping): logits -> softcap * tanh(logits / softcap) before the
    softmax; no fused kernel caps, so every stage then runs on the explicit path."""
    B, H, L, D = stages[0].q.shape
    fused = fused and softcap is None
    p0 = int(q_pos[0])
    scores = [torch.zeros(B, H, st.k.shape[2], dtype=torch.float32, device=st.q.device) if st.want_scores else None
              for st in stages]
    out = stages[0].q.new_empty(B, H, L, D) if out is None else out
    if fused and len(stages) == 1 and not stages[0].want_scores:
        return _single_stage_sdpa(stages[0], p0, scale, out), scores
    joined, o_f, lse_f = _fused_stages(stages, scale) if fused else ([], None, None)  # [B, H, L, D], [B, H, L]
    ex = _Explicit(stages, [i for i in range(len(stages)) if i not in joined], scale, q_tile, softcap)
    for s in range(0, L, q_tile):
        e = min(L, s + q_tile)
        rows = (B, ex.H_kv, ex.G, e - s)  # the tile's query rows: head kv_head * G + g, query s + t
        fused_tile = None if o_f is None else (o_f[:, :, s:e].reshape(*rows, D), lse_f[:, :, s:e].reshape(*rows, 1))
        parts = ex.logits(s, e, p0)  # 2. logits [*rows, visible keys] per explicit stage
        acc, denom, m = _join_softmax(parts, fused_tile)  # 3. [*rows, D], [*rows, 1], [*rows, 1]
        for i in joined:  # 4. a fused kernel returns no probabilities: recomputed from the joint log-sum-exp
            if scores[i] is not None:
                scores[i] += _fused_probs(stages[i], s, e, scale, m + denom.log())
        inv = denom.reciprocal_()  # [*rows, 1]
        for p in parts:
            if scores[p.i] is not None:  # 4. lg * weight / denom, summed over the tile's queries
                f = inv if p.weight is None else p.weight * inv
                scores[p.i][:, :, p.a : p.b] += torch.matmul(f.transpose(-1, -2), p.lg).view(B, H, p.b - p.a)
        out[:, :, s:e] = acc.mul_(inv).reshape(B, H, e - s, D).to(out.dtype)  # 5.
    return out, scores


def _fused_stages(stages: list[Stage], scale: float) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
    """Step 1: the stages after the first that `_fused_stage` takes, merged: (their indices, output [B, H, L, D],
    log-sum-exp [B, H, L]); lse = logaddexp of theirs, output weighted by exp(lse_i - lse)."""
    joined, o_f, lse_f = [], None, None
    for i in range(1, len(stages)):
        r = _fused_stage(stages[i], scale)
        if r is not None:
            joined.append(i)
            o_i, lse_i = r
            if o_f is None:
                o_f, lse_f = o_i, lse_i
                continue
            new = torch.logaddexp(lse_f, lse_i)
            o_f = o_f * (lse_f - new).exp_()[..., None] + o_i * (lse_i - new).exp_()[..., None]
            lse_f = new
    return joined, o_f, lse_f


def _fused_probs(st: Stage, s: int, e: int, scale: float, lse: torch.Tensor) -> torch.Tensor:
    """A fused stage's probabilities for queries [s, e) given the joint log-sum-exp lse [B, H_kv, G, tq, 1], summed
    over those queries: [B, H, T]."""
    B, H_kv, G, tq, _ = lse.shape
    qt = (st.q[:, :, s:e].float() * scale).reshape(B, H_kv, G * tq, -1)
    p = torch.matmul(qt, st.k.float().transpose(-1, -2)).view(B, H_kv, G, tq, -1).sub_(lse).exp_()
    return p.sum(dim=3).reshape(B, H_kv * G, -1)


def _all_rows_see_a_key(q0: int, q1: int, k0: int, k1: int, band) -> bool:
    """Whether every query position in [q0, q1) sees a key among positions [k0, k1) (k1 > k0), from positions alone
    (no read of device logits): the keys a query sees are an interval sliding with it, so the first and the last
    query decide."""
    if band is None:
        return True
    lo, hi = band
    return lo <= hi and q0 - lo >= k0 and (q1 - 1) - hi <= k1 - 1


@dataclass
class _Part:
    """One explicit stage's share of a query tile: its keys [a, b) visible to some query of the tile."""

    i: int  # index into `stages`
    a: int
    b: int
    lg: torch.Tensor  # [B, H_kv, G, tq, b - a]: logits, -inf out of band; probabilities after `_join_softmax`
    v: torch.Tensor  # values [nb, b - a, D] as bmm operand (nb = B * H_kv * sp, see `_Explicit.logits`)
    all_rows: bool  # every query of the tile sees some key of it (`_all_rows_see_a_key`)
    weight: torch.Tensor | None = None  # [B, H_kv, G, tq, 1]: turns lg into exp(logit - m); None = lg is that


class _Explicit:
    """The stages off the fused kernel, prepared once for the tile loop: queries in fp32 times `scale`
    [B, H, L, D]; K/V in fp32 [B, H_kv, split, T, D] (`_split_kv`: each KV head's query rows go to `split` bmm
    problems, `_row_split`); a logits buffer per stage (`_scratch`), reused by every tile."""

    def __init__(self, stages: list[Stage], idx: list[int], scale: float, q_tile: int,
                 softcap: float | None = None):
        B, H, L, _ = stages[0].q.shape
        self.softcap = softcap
        self.stages, self.idx, self.H_kv = stages, idx, stages[0].k.shape[1]
        self.G, dev, n_rows = H // self.H_kv, stages[0].q.device, B * H * min(q_tile, L)  # rows of a full tile
        self.split = _row_split(B * self.H_kv, self.G * min(q_tile, L), dev)
        self.q = {i: stages[i].q.float() * scale for i in idx}
        self.k = {i: _split_kv(stages[i].k, self.split, ("k", i)) for i in idx}
        self.v = {i: _split_kv(stages[i].v, self.split, ("v", i)) for i in idx}
        self.buf = {i: _scratch(i, n_rows * stages[i].k.shape[2], dev) for i in idx}

    def logits(self, s: int, e: int, p0: int) -> list[_Part]:
        """Step 2, queries [s, e) at positions p0 + s ..: per stage, logits over the keys some query of the tile
        sees, masked where the tile straddles a band edge; stages of which it sees no key are left out."""
        B, H_kv, G, tq = self.stages[0].q.shape[0], self.H_kv, self.G, e - s
        sp = self.split if (G * tq) % self.split == 0 else 1  # a short last tile may not divide
        nb, rows = B * H_kv * sp, G * tq // sp  # bmm problems: each KV head's query rows cut into sp parts
        parts = []
        for i in self.idx:
            st = self.stages[i]
            T, D = st.k.shape[2:]
            a, b = (0, T) if st.band is None else _visible_range(p0 + s, p0 + e - 1, st.k_start, T, st.band)
            if b == a:
                continue
            lg = self.buf[i][: B * H_kv * G * tq * (b - a)].view(nb, rows, b - a)
            torch.bmm(self.q[i][:, :, s:e].reshape(nb, rows, D),
                      self.k[i][:, :, :sp, a:b].reshape(nb, b - a, D).transpose(-1, -2), out=lg)
            lg = lg.view(B, H_kv, G, tq, b - a)
            if self.softcap is not None:
                lg.div_(self.softcap).tanh_().mul_(self.softcap)
            q0, k0, k1 = p0 + s, st.k_start + a, st.k_start + b
            if st.band is not None:
                _mask_band_edges(lg, q0, q0 + tq, k0, k1, st.band)
            v = self.v[i][:, :, :sp, a:b].reshape(nb, b - a, D)
            parts.append(_Part(i, a, b, lg, v, _all_rows_see_a_key(q0, q0 + tq, k0, k1, st.band)))
        return parts


def _join_softmax(parts: list[_Part], fused_tile) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 3 on one tile, rows [B, H_kv, G, tq]: (acc [.., D] = sum of exp(logit - m) * value over all keys,
    denom [.., 1] = sum of exp(logit - m), m [.., 1] the shared row max); `fused_tile`: the fused stages' (output
    [.., D], log-sum-exp [.., 1]) or None. A part where every row sees a key takes torch's row softmax in place
    (one kernel, rows in cache), joined by its lse_i = max_i - log(max probability): weight exp(lse_i - m). A
    part with a row that sees none of its keys (the remainder, for queries whose window still covers it) would
    get NaN from it (-inf row max), so it is exponentiated against m, finite as every row sees some key. Which
    case holds comes from positions (`_all_rows_see_a_key`): no device tensor is read on the host."""
    maxes = [p.lg.amax(dim=-1, keepdim=True) for p in parts]
    m = torch.stack(maxes).amax(dim=0)
    if fused_tile is not None:
        m = torch.maximum(m, fused_tile[1])
    acc = denom = None
    for p, mx in zip(parts, maxes):
        if p.all_rows:
            torch.ops.aten._softmax.out(p.lg, -1, False, out=p.lg)
            rs = p.weight = (mx - p.lg.amax(dim=-1, keepdim=True).log_() - m).exp_()  # exp(lse_i - m)
        else:
            rs = p.lg.sub_(m).exp_().sum(dim=-1, keepdim=True)
        denom = rs.clone() if denom is None else denom.add_(rs)
        o = torch.bmm(p.lg.view(p.v.shape[0], -1, p.b - p.a), p.v).view(*p.lg.shape[:-1], p.v.shape[-1])
        if p.weight is not None:
            o.mul_(p.weight)
        acc = o if acc is None else acc.add_(o)
    if fused_tile is not None:
        w = (fused_tile[1] - m).exp_()  # weight of the fused stages
        denom, acc = denom.add_(w), acc.add_(fused_tile[0] * w)
    return acc, denom, m
