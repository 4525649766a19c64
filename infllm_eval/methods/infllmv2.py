"""InfLLM-V2's sparse attention (Zhao et al., arXiv 2509.24663; MiniCPM4 / MiniCPM4.1), applied training-free.

Every key is kept, rotated once at its true position. Per KV group and per query, the method picks `block_size`-token
blocks by a cheap stage 1 and attends to the chosen blocks in stage 2:
1. compressed keys: C1 = mean of `kernel_size` rotated keys every `kernel_stride` tokens, C2 the same with 4x kernel
   and 4x stride (fixed in the original: `CompressK(kernel_size*4, kernel_stride*4)`); a kernel is visible to a query
   once its last token is at or before it;
2. per query head, p(j) = exp(s q.C1_j - lse), where lse is the log-sum-exp of s q.C2 over the visible C2
   (`lse_mode: coarse`, the kernel's "LSE approximation") or of s q.C1 (`exact`, the paper's "w/o LSE approx"); p
   summed over the query heads of the KV group (the kernel's `hdim16_reduce`);
3. block score = max of those sums over kernels [b*r - 1, b*r + r - 1], r = block_size / kernel_stride (the
   original's `max_pooling_1d_varlen`: window r + 1, stride r, padding 1);
4. the first `init_blocks` blocks and the query's own block with the `window_size / block_size` blocks before it are
   forced; the other past blocks fill `topk - init_blocks - 1` slots by score (descending, then block index
   ascending: deterministic where the CUDA top-k is not). `topk` keeps the original's meaning: the code selects
   `topk + window_size // block_size` blocks in all (64 + 32 = 96 for MiniCPM4.1), of which 1 + 33 are forced;
   while a query has at most that many past blocks, it sees every one of them (dense);
5. softmax attention of the rotated query over the keys <= t of the chosen blocks, scale 1/sqrt(d).
A forward call whose last position + 1 is below `dense_len` is plain causal attention (-1 = never).

Sources (read, not copied): OpenBMB/infllmv2_cuda_impl @ f908e73 (`infllm_v2/infllmv2_sparse_attention.py`,
`max_pooling_1d.py`, `csrc/flash_attn/src/flash_fwd_kernel.h: compute_attn_1rowblock_splitkv_stage1`, `mask.h:
apply_mask_stage1`) and MiniCPM4.1's HF `modeling_minicpm.py` (`MiniCPMInfLLMv2Attention`, `CompressK`); parameter
names are the `sparse_config` keys. Spec: shared/reference/methods-wave2.md section 1.

GQA: the KV group's query heads share one selection (MHA: each head is its group); the kernel needs 16 heads per
group and repeat-interleaves fewer, which only scales the sum (same ranking), so the sum is over the real heads.

Harness decisions ([inferred], recorded in describe()):
- chunked prefill (the HF code cannot chunk): every query gets the per-query semantics above with the kernels
  complete at its own position; the dense switch is per call, with L = the call's last position + 1.
- `quirk_15mod16` (default false): the kernel's causal offset takes (Lq - 15) // 16 as the query's kernel count
  where `CompressK` makes (Lq - 16) // 16, so in a prefill of Lq = 15 (mod 16) tokens every query sees one level-1
  kernel fewer (level 2: Lq = 63 mod 64). true reproduces it for multi-token calls whose end L = kernel_stride - 1
  (mod kernel_stride), resp. 4 * kernel_stride - 1 (mod 4 * kernel_stride); decoding runs the kernel non-causal,
  so one-token calls never have it.
- scores in fp32 (`score_bf16: false`); true rounds the group sums to bf16 as the kernel stores them (more ties,
  broken by block index here, unspecified on CUDA).
- a query with no visible normaliser key (no C2 yet in coarse mode) scores every kernel 0 (the kernel's NaN -> 0).
- `use_nope`: selection (C1, C2 and the query) on un-rotated vectors; attention stays rotated.

Implementation: K/V and C1 / C2 are kept incrementally (`_Layer`); a call's queries are tiled (`q_tile`), and per
tile stage 1 is [H_kv, G, tile, kernels] matmuls, top-k a stable sort over blocks, and stage 2 one masked softmax over
the union of the tile's chosen blocks (gathered; torch's SDPA with a boolean block mask, or with `fattn: false` the
explicit fp32 path). Queries before the sparse regime go through the dense kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from infllm_eval.errors import UserError
from infllm_eval.methods import METHODS
from infllm_eval.methods.base import ContextMethod
from infllm_eval.methods.kernels import INF, Stage, multi_stage_attention


class _Layer:
    """One layer's keys: rotated K / V at true positions [H_kv, capacity, D], zero past `len` (capacity a multiple of
    block_size, so the current partial block reads as a whole block), the un-rotated K when selection uses it, and
    the compressed keys `c[level]` [H_kv, m[level], D] (fp32) of every complete kernel."""

    def __init__(self, block: int, levels: tuple[tuple[int, int], ...], nope: bool):
        self.block, self.levels, self.nope = block, levels, nope
        self.len, self.k, self.v, self.raw = 0, None, None, None
        self.c, self.m = [None] * len(levels), [0] * len(levels)

    @staticmethod
    def _fit(buf: torch.Tensor | None, like: torch.Tensor, n: int, used: int, unit: int) -> torch.Tensor:
        """buf with room for n rows along dim 1 (zero-filled growth, x2 amortised, a multiple of unit)."""
        if buf is not None and buf.shape[1] >= n:
            return buf
        cap = -(-max(n, 2 * (0 if buf is None else buf.shape[1])) // unit) * unit
        new = like.new_zeros(like.shape[0], cap, like.shape[-1])
        if buf is not None:
            new[:, :used] = buf[:, :used]
        return new

    def append(self, k: torch.Tensor, v: torch.Tensor, raw: torch.Tensor) -> None:
        """k (rotated), v, raw (un-rotated k): [H_kv, L, D]; then adds the kernels completed by these tokens."""
        n0, n1 = self.len, self.len + k.shape[1]
        self.k = self._fit(self.k, k, n1, n0, self.block)
        self.v = self._fit(self.v, v, n1, n0, self.block)
        self.k[:, n0:n1], self.v[:, n0:n1] = k, v
        if self.nope:
            self.raw = self._fit(self.raw, raw, n1, n0, self.block)
            self.raw[:, n0:n1] = raw
        self.len = n1
        src = self.raw if self.nope else self.k
        for i, (size, stride) in enumerate(self.levels):
            if self.c[i] is None:
                self.c[i] = k.new_zeros(k.shape[0], 0, k.shape[2], dtype=torch.float32)
            m = max(0, (n1 - size) // stride + 1)  # complete kernels: stride * j + size <= len
            if m > self.m[i]:
                win = src[:, stride * self.m[i] : stride * (m - 1) + size].float().unfold(1, size, stride)
                self.c[i] = self._fit(self.c[i], win[..., 0], m, self.m[i], 64)
                self.c[i][:, self.m[i] : m] = win.mean(-1)  # [H_kv, new kernels, D]
                self.m[i] = m

    def nbytes(self) -> int:
        k = self.k[:, :1]
        own = (3 if self.nope else 2) * self.len * k.numel() * k.element_size()
        return own + sum(m * c[:, :1].numel() * 4 for c, m in zip(self.c, self.m) if c is not None)


@METHODS.register("infllmv2")
class InfLLMv2(ContextMethod):
    name = "infllmv2"
    position_scheme = "true (keys rotated once at their positions; selection on rotated q/k unless use_nope)"
    param_names = ("kernel_size", "kernel_stride", "init_blocks", "block_size", "window_size", "topk", "use_nope",
                   "dense_len", "lse_mode", "quirk_15mod16", "score_bf16", "base", "distance_scale")

    def validate(self) -> None:
        super().validate()
        p = self.params
        for key in ("kernel_size", "kernel_stride", "block_size", "topk", "init_blocks", "window_size", "dense_len"):
            lo = {"init_blocks": 0, "window_size": 0, "dense_len": -1}.get(key, 1)
            if not isinstance(p[key], int) or isinstance(p[key], bool) or p[key] < lo:
                raise UserError(f"method.params.{key} must be an integer >= {lo}, got {p[key]!r}.")
        if p["block_size"] % p["kernel_stride"]:
            raise UserError(f"method.params.block_size ({p['block_size']}) must be a multiple of kernel_stride "
                            f"({p['kernel_stride']}): blocks max-pool whole steps of kernels.")
        if p["topk"] <= p["init_blocks"]:
            raise UserError(f"method.params.topk ({p['topk']}) must exceed init_blocks ({p['init_blocks']}): its "
                            f"slots hold the init blocks, the query's own block and the blocks picked by score.")
        if p["lse_mode"] not in ("coarse", "exact"):
            raise UserError(f"method.params.lse_mode must be 'coarse' (normaliser from C2, the kernel) or 'exact' "
                            f"(from C1), got {p['lse_mode']!r}.")
        for key in ("use_nope", "quirk_15mod16", "score_bf16"):
            if not isinstance(p[key], bool):
                raise UserError(f"method.params.{key} must be true or false, got {p[key]!r}.")

    def bind(self, model, spec) -> None:
        super().bind(model, spec)
        p = self.params
        self.B, self.ks, self.s = p["block_size"], p["kernel_size"], p["kernel_stride"]
        self.levels = ((self.ks, self.s), (4 * self.ks, 4 * self.s))
        self.r = self.B // self.s  # kernels per block step of the max-pool
        self.local = p["window_size"] // self.B  # local blocks before the query's own block
        self.k_eff = p["topk"] + self.local  # blocks selected in all (the original's topk + window/block)
        self.n_free = p["topk"] - p["init_blocks"] - 1  # blocks picked by score once a query has > k_eff blocks

    def new_state(self, layer_idx: int) -> dict:
        return {"kv": _Layer(self.params["block_size"], self.levels, self.params["use_nope"])}

    def attend(self, state, q, k, v, pos, out=None):
        L, p0 = q.shape[2], int(pos[0])
        p1 = p0 + L
        qr, kr = self.rope.rotate_range(q, p0), self.rope.rotate_range(k, p0)
        st: _Layer = state["kv"]
        st.append(kr[0], v[0], k[0])
        out = q.new_empty(q.shape) if out is None else out
        # queries before d are dense: the whole call below dense_len, else those with <= k_eff blocks (all selected)
        d = p1 if p1 < self.params["dense_len"] else min(p1, max(p0, self.k_eff * self.B))
        if d > p0:
            stage = Stage(qr[:, :, : d - p0], st.k[None, :, :d], st.v[None, :, :d], k_start=0, band=(0, INF))
            multi_stage_attention([stage], pos[: d - p0], self.scale, self.q_tile, self.fattn, out=out[:, :, : d - p0])
        quirk = self.params["quirk_15mod16"] and L > 1  # the kernel's causal (multi-query) offset
        lag = [int(quirk and p1 % stride == stride - 1) for _, stride in self.levels]
        q_sel = q if self.params["use_nope"] else qr
        for a in range(d, p1, self.q_tile):
            e = min(p1, a + self.q_tile)
            t = torch.arange(a, e, device=q.device)
            sel = self._select(st, q_sel[0, :, a - p0 : e - p0], t, lag)
            out[0, :, a - p0 : e - p0] = self._attend_blocks(st, qr[0, :, a - p0 : e - p0], t, sel).to(out.dtype)
        return out

    def _select(self, st: _Layer, q: torch.Tensor, t: torch.Tensor, lag: list[int]) -> torch.Tensor:
        """Stage 1 for queries q [H, tq, D] at positions t [tq] (each with more than k_eff blocks) -> chosen blocks,
        bool [H_kv, tq, nB] over blocks 0 .. t[-1] // block_size. Only the kernels that the candidate blocks' pooling
        windows reach are scored (and, for `exact`, the visible ones of the normaliser)."""
        H, tq, D = q.shape
        H_kv, B, r, init = st.k.shape[0], self.B, self.r, self.params["init_blocks"]
        qq = q.float().view(H_kv, H // H_kv, tq, D) * self.scale
        qb = t // B
        free_end = int(qb[-1]) - self.local  # candidates: blocks init .. qb - local - 1

        def logits(i: int, n: int) -> torch.Tensor:  # s q.C over the first n kernels of level i, hidden -inf
            size, stride = self.levels[i]
            seen = torch.div(t - size + stride + 1, stride, rounding_mode="floor").sub_(lag[i]).clamp_(min=0)
            n = min(n, st.m[i])
            lg = torch.matmul(qq, st.c[i][:, None, :n].transpose(-1, -2))  # [H_kv, G, tq, n]
            lo = min(n, int(seen[0]))  # kernels before lo: visible to every query of the tile
            if lo < n:
                lg[..., lo:].masked_fill_(torch.arange(lo, n, device=t.device) >= seen[:, None], -INF)
            return lg

        n1 = free_end * r  # kernels the candidates' windows reach
        if self.params["lse_mode"] == "coarse":
            lse = torch.logsumexp(logits(1, st.m[1]), -1, keepdim=True)  # [H_kv, G, tq, 1]
            lg1 = logits(0, n1)
        else:
            lg1 = logits(0, st.m[0])
            lse = torch.logsumexp(lg1, -1, keepdim=True)
            lg1 = lg1[..., :n1]
        lse.masked_fill_(lse == -INF, INF)  # no visible normaliser key: every score 0 (the kernel's NaN -> 0)
        score = lg1.sub_(lse).exp_().sum(1)  # [H_kv, tq, <= n1]: p summed over the group's query heads
        if self.params["score_bf16"]:
            score = score.bfloat16().float()
        padded = score.new_full((H_kv, tq, n1), -INF)
        padded[..., : score.shape[-1]] = score
        blk = F.max_pool1d(padded, r + 1, r, padding=1)[..., init:free_end]  # kernels [b*r-1, b*r+r-1]
        blk.masked_fill_(torch.arange(init, free_end, device=t.device) >= (qb - self.local)[:, None], -INF)
        pick = torch.sort(blk, dim=-1, descending=True, stable=True).indices[..., : self.n_free] + init
        b = torch.arange(int(qb[-1]) + 1, device=t.device)
        sel = ((b < init) | ((b >= (qb - self.local)[:, None]) & (b <= qb[:, None]))).expand(H_kv, tq, -1).clone()
        return sel.scatter_(-1, pick, True)

    def _attend_blocks(self, st: _Layer, q: torch.Tensor, t: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        """Stage 2: queries q [H, tq, D] (rotated) at positions t over the keys <= t of their chosen blocks sel
        [H_kv, tq, nB]: one softmax over the union of the tile's blocks (gathered, per KV group padded with
        unchosen blocks in front), chosen blocks by a block mask, causal inside the blocks of the queries (the
        last ones of every group's union) -> [H, tq, D]."""
        H, tq, D = q.shape
        H_kv, _, nB = sel.shape
        G, B = H // H_kv, self.B
        union = sel.any(1)  # [H_kv, nB]
        U = int(union.sum(-1).max())
        idx = torch.sort(union.to(torch.int8), dim=-1, stable=True).indices[:, nB - U :]  # [H_kv, U] ascending
        heads = torch.arange(H_kv, device=t.device)[:, None]
        ku = st.k[:, : nB * B].view(H_kv, nB, B, D)[heads, idx].view(H_kv, U * B, D)
        vu = st.v[:, : nB * B].view(H_kv, nB, B, D)[heads, idx].view(H_kv, U * B, D)
        ok = sel.gather(-1, idx[:, None].expand(H_kv, tq, U))  # [H_kv, tq, U]: the query chose the block
        q0 = int(t[0]) // B  # blocks q0 .. nB - 1 hold the tile's queries: the last nq of every union
        nq = nB - q0
        future = (q0 * B + torch.arange(nq * B, device=t.device) > t[:, None]).view(tq, nq, B)
        qf = q.reshape(H_kv, G * tq, D)
        if self.fattn:  # torch's fused kernel with a boolean mask
            mask = ok[..., None].expand(H_kv, tq, U, B).clone()
            mask[:, :, U - nq :].logical_and_(~future)
            mask = mask[:, None].expand(H_kv, G, tq, U, B).reshape(1, H_kv, G * tq, U * B)
            o = F.scaled_dot_product_attention(qf[None], ku[None], vu[None], attn_mask=mask, scale=self.scale)[0]
            return o.reshape(H, tq, D)
        lg = torch.bmm(qf.float() * self.scale, ku.float().transpose(1, 2)).view(H_kv, G, tq, U, B)
        lg.masked_fill_(~ok[:, None, :, :, None], -INF)
        lg[..., U - nq :, :].masked_fill_(future, -INF)
        lg = lg.view(H_kv, G * tq, U * B)
        torch.ops.aten._softmax.out(lg, -1, False, out=lg)
        return torch.bmm(lg, vu.float()).view(H, tq, D)

    # -- accounting -------------------------------------------------------------------------------------------
    def attended_keys(self, p: int) -> int:
        """A decoding query at p: every key while dense (p + 1 < dense_len, or <= k_eff blocks), else k_eff - 1 whole
        blocks and its own partial block (the stage-1 scoring of length / kernel_stride * 5/4 compressed keys is
        not counted)."""
        if p + 1 < self.params["dense_len"] or p < self.k_eff * self.B:
            return p + 1
        return (self.k_eff - 1) * self.B + p % self.B + 1

    def memory_model(self, length: int, chunk: int, device: str) -> dict[str, int]:
        """Every token's K/V on the device (plus the un-rotated K with use_nope, and C1 + C2, one key each: half a
        token). A query tile is scored against the union of its blocks: the init and local blocks, the blocks its
        queries span, and each query's picks (at most every key)."""
        p = self.params
        B, s = p["block_size"], p["kernel_stride"]
        compressed = sum(max(0, (length - size) // stride + 1)
                         for size, stride in ((p["kernel_size"], s), (4 * p["kernel_size"], 4 * s)))
        extra = (length if p["use_nope"] else 0) + compressed
        tile = min(self.q_tile, chunk)
        local = p["window_size"] // B
        union = B * (p["init_blocks"] + local + 1 + -(-tile // B) + tile * (p["topk"] - p["init_blocks"] - 1))
        sparse = length >= p["dense_len"]
        return {"device_tokens": length + -(-extra // 2), "host_tokens": 0,
                "workspace_keys": min(length, union) if sparse else length}
