"""HiP attention v1.0 (Lee et al., "A Training-Free Sub-quadratic Cost Transformer Model Serving Framework With
Hierarchically Pruned Attention", arXiv 2406.09827; DeepAuto-AI/hip-attention @ fea42c77, `src/hip_attn/v1_0/
attention1_block_gpu.py: hip_attention, hip_attention_mask`, `attention1_block_gpu_kernel/masking_iteration.py`,
`safe_indices.py`, `calc_prob_return_context.py`).

Every call (chunk of prefill, or one decoded token) takes the whole KV cache, rotated at true positions (there is no
re-positioning in v1.0). Its queries are cut into blocks of `block_size_q`; each query head estimates, per block,
`mask_k` keys as blocks of `block_size_k` by a hierarchical top-k search (`hip_mask.estimate`: start from
mask_k / bk evenly spaced nodes, repeatedly split every kept node into its children at twice the resolution and keep
the best by the max dot product of every `reduce_stride`-th query of the block with the child's first bk keys;
keys inside the sliding-window area are not scored). A query then attends, in one softmax, to the `num_sink` sink
blocks, the selected blocks, and the sliding window [end_b - sliding_window_size, end_b) of its block (end_b = one
past the block's last query slot: `(b + 1) * block_size_q` into the call, not clamped for a short last block),
causally. GQA: each query head selects on its own KV head.

Call structure, as `hip_attention` (the engine calls it once per prefill chunk, then per token):
- a call of more than 32 queries is a "prompt": its queries at absolute position < `dense_queries_exp` attend
  densely (null = the original's per-call default int((log2(T/mask_k/2) * mask_k + mask_k) * 3), T = keys of the
  call; 0 = off, the legacy research path); the rest is HiP with its blocks starting at the first sparse query;
- block_size_q is clamped to next_pow2(queries of the call), so a decoded token is one block of 1 (block_size_k
  to next_pow2(T)); num_sink null = ceil(32 / block_size_k) blocks;
- calls of <= 32 queries split the search into `ksrc_stride` interleaved source grids (null = the original's
  min(32, max(1, round(mask_k / (16 * block_size_k)))), 16 at the defaults), each with mask_k / stride of the budget,
  merged by sorting (the kernel's GRID_SRC_STRIDE).

Switches (conf/method/hip.yaml holds the defaults): `sampling_method` "first" only ("random" adds
`tl.random.rand` jitter at iteration N//2 and is refused, as it is not reproducible); `enable_sparq` (the original
default true; off here, the spec's deterministic reference mode): score on the `sparq_hid` dims of largest summed
|q| over the block (half of them in the first iteration, as the kernel), only when mask_k / bk >= `sparq_start_bk`
and T >= `sparq_start_tsrc`; `estimator_lower_resolution` (original 2; 1 here): when mask_k / bk >
`estimator_lower_resolution_stop_n_blocks`, estimate with mask_k / r, then each selected block brings its r - 1
successors through the collision avoidance of `safe_indices`.

Quirks of the original kept (switch where separable):
- `pixel_slot_quirk` (default true = the kernel): a node's children are written at slot inclusive-cumsum(children) -
  children(first node) instead of the exclusive cumsum; where nodes have different child counts (every iteration
  whose width does not exactly double, e.g. the last one) children overwrite each other and stale candidates from
  the previous iteration fill the gaps. false = packed slots.
- node locations are fp32 fractions and parents come from float64 products truncated to int (a node's parent index
  is one lower about half the time); candidate capacity next_pow2(TM), halved after the first iteration; slots
  beyond the kept nodes keep stale values (they matter where grids are merged). Not switchable: it is the
  algorithm's own arithmetic.
[inferred] decisions: ties at the top-k threshold keep the lower candidate index (the kernel overfills the last slot,
order undefined on GPU); candidates whose every (query, key) pair is masked (window area, future) rank below all
scored ones and tie among themselves (the kernel ranks them by 32000 - dot in fp32; they all lie in the window or
the future, so only their slots differ); SparQ dim ties: lower dim first; a block whose width never grows
(T_b <= w_start / scale_up) keeps its initial nodes, i.e. attends densely (the kernel leaves ws/ks unwritten);
scoring and attention in fp32 (the kernel scores in fp16 after max-abs normalisation, not reproduced); the
kernel's out-of-bounds slot writes are dropped.
"""

from __future__ import annotations

import math

import torch

from infllm_eval.errors import UserError
from infllm_eval.methods import METHODS
from infllm_eval.methods.base import ContextMethod
from infllm_eval.methods.hip_mask import MaskConfig, cdiv, estimate, next_pow2
from infllm_eval.methods.kernels import INF, Stage, multi_stage_attention

_INTS = ("mask_k", "block_size_q", "block_size_k", "reduce_stride", "sliding_window_size", "sparq_hid",
         "sparq_start_bk", "sparq_start_tsrc", "estimator_lower_resolution", "estimator_lower_resolution_stop_n_blocks")


@METHODS.register("hip")
class HiPAttention(ContextMethod):
    name = "hip"
    position_scheme = "true (q and k rotated at their positions)"
    param_names = ("mask_k", "block_size_q", "block_size_k", "scale_up", "w_start", "n_patches", "reduce_method",
                   "reduce_stride", "sliding_window_size", "num_sink", "sampling_method", "enable_sparq", "sparq_hid",
                   "sparq_start_bk", "sparq_start_tsrc", "estimator_lower_resolution",
                   "estimator_lower_resolution_stop_n_blocks", "dense_queries_exp", "ksrc_stride",
                   "pixel_slot_quirk", "base", "distance_scale")

    def validate(self) -> None:
        super().validate()
        p = self.params
        for key in _INTS:
            v = p[key]
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise UserError(f"method.params.{key} must be a positive integer, got {v!r}.")
        for key in ("w_start", "n_patches", "num_sink", "dense_queries_exp", "ksrc_stride"):
            v = p[key]
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise UserError(f"method.params.{key} must be null or a non-negative integer, got {v!r}.")
        if not isinstance(p["scale_up"], (int, float)) or isinstance(p["scale_up"], bool) or p["scale_up"] <= 1:
            raise UserError(f"method.params.scale_up must be a number > 1, got {p['scale_up']!r}.")
        if p["sampling_method"] != "first":
            raise UserError(f"method.params.sampling_method must be 'first': 'random' jitters the node locations with "
                            f"an unseeded GPU generator and is not reproduced, got {p['sampling_method']!r}.")
        if p["reduce_method"] != "max":
            raise UserError(f"method.params.reduce_method must be 'max' (the only one the kernel implements), got "
                            f"{p['reduce_method']!r}.")
        for key in ("enable_sparq", "pixel_slot_quirk"):
            if not isinstance(p[key], bool):
                raise UserError(f"method.params.{key} must be true or false, got {p[key]!r}.")
        for key in ("n_patches", "w_start", "ksrc_stride"):
            if p[key] == 0:
                raise UserError(f"method.params.{key} must be null or a positive integer, got 0.")
        if (p["n_patches"] or 0) > p["mask_k"]:
            raise UserError(f"method.params.n_patches ({p['n_patches']}) must be <= mask_k ({p['mask_k']}).")
        if p["w_start"] is not None and round(p["w_start"] / p["scale_up"]) > p["mask_k"]:
            raise UserError(f"method.params.w_start ({p['w_start']}) must be <= mask_k * scale_up, as the original "
                            f"asserts.")
        if p["sliding_window_size"] < p["block_size_q"]:
            raise UserError(f"method.params.sliding_window_size ({p['sliding_window_size']}) must be >= block_size_q "
                            f"({p['block_size_q']}), so every query sees itself.")

    def new_state(self, layer_idx: int) -> dict:
        return {"kv": None}

    # -- per call --------------------------------------------------------------------------------------------
    def dense_queries(self, L: int, T: int) -> int:
        """How many leading queries of a call of L queries over T keys attend densely (`hip_attention`)."""
        p = self.params
        if L <= 32 or p["dense_queries_exp"] == 0:
            return 0
        dqe = p["dense_queries_exp"]
        if dqe is None:
            dqe = int((math.log2(T / p["mask_k"] / 2) * p["mask_k"] + p["mask_k"]) * 3)
        return min(L, max(0, dqe - T + L)) if dqe > 0 else 0

    def mask_config(self, L: int, T: int) -> tuple[MaskConfig, int]:
        """(the estimator's constants, num_sink blocks) for a sparse call of L queries over T keys."""
        p = self.params
        bq, bk = min(p["block_size_q"], next_pow2(L)), min(p["block_size_k"], next_pow2(T))
        mask_k, s = p["mask_k"], p["scale_up"]
        w_start = p["w_start"] if p["w_start"] is not None else math.ceil(mask_k * s)
        n_patches = p["n_patches"] if p["n_patches"] is not None else math.ceil(mask_k / s)
        grid = 1
        if L <= 32:
            grid = p["ksrc_stride"] or min(32, max(1, round(mask_k / (bk * 16))))
        lr = p["estimator_lower_resolution"] if cdiv(mask_k, bk) > p["estimator_lower_resolution_stop_n_blocks"] else 1
        mask_k, w_start, n_patches = mask_k // lr, w_start // lr, n_patches // lr
        sparq = p["enable_sparq"] and mask_k // bk >= p["sparq_start_bk"] and T >= p["sparq_start_tsrc"]
        cfg = MaskConfig(mask_k=mask_k, w_start=w_start, n_patches=n_patches, scale_up=s, bq=bq, bk=bk,
                         reduce_stride=p["reduce_stride"], sliding_window_size=p["sliding_window_size"], grid=grid,
                         sparq_hid=p["sparq_hid"] if sparq else None, lower_resolution=lr,
                         pixel_slot_quirk=p["pixel_slot_quirk"])
        return cfg, (p["num_sink"] if p["num_sink"] is not None else cdiv(32, bk))

    def attend(self, state, q, k, v, pos, out=None):
        p0, L = int(pos[0]), q.shape[2]
        q, keys, values = self.append_rotated(state, q, k, v, p0)  # [1, H_kv, T, D], positions 0..T-1
        T = keys.shape[2]
        out = q.new_empty(q.shape) if out is None else out
        nd = self.dense_queries(L, T)
        if nd:
            stage = Stage(q[:, :, :nd], keys[:, :, : p0 + nd], values[:, :, : p0 + nd], k_start=0, band=(0, INF))
            multi_stage_attention([stage], q_pos=pos[:nd], scale=self.scale, q_tile=self.q_tile, fused=self.fattn,
                                  out=out[:, :, :nd])
        if nd < L:
            cfg, num_sink = self.mask_config(L - nd, T)
            qs = q[0, :, nd:].float()
            kf, vf = keys[0].float(), values[0].float()
            starts, count = estimate(qs, kf, cfg)
            out[0, :, nd:] = self.sparse_attention(qs, kf, vf, starts, count, cfg, num_sink).to(out.dtype)
        return out

    def sparse_attention(self, q, keys, values, starts, count, cfg: MaskConfig, num_sink: int,
                         tile_floats: int = 1 << 23) -> torch.Tensor:
        """q [H, L, D] (the sparse queries, last L of T), keys/values [H_kv, T, D] -> [H, L, D]: per (head, block)
        one softmax over the sink, the window and the selected blocks, causal. Work layout [H_kv, blocks, G, bq,
        keys]: sink and window keys are shared by a KV head's query heads (the window as a strided view of the
        padded cache, no gather); selected blocks are gathered per query head, bk keys per index. The softmax is
        taken over the three parts without concatenating them (one max, one sum). Tiled over query blocks.

        A selected key lies outside the block's window [end_b - sliding_window_size, end_b) and sliding_window_size
        >= block_size_q, so it is either before every query of the block or after all of them: its causal mask is
        one bit per (head, block, key), not per query."""
        H, L, D = q.shape
        Hkv, T, _ = keys.shape
        G, bq, bk, sw = H // Hkv, cfg.bq, cfg.bk, cfg.sliding_window_size
        nb, dev = starts.shape[1], q.device
        S = min(num_sink * bk, T)
        nsel = int(count.max()) if count.numel() else 0
        kk = nsel * bk
        end = T - L + (torch.arange(nb, device=dev) + 1) * bq  # [nb] one past the block's last query slot
        # selected keys [H, nb, kk]; those in the sink, past T, inside or after the block's window are dropped
        sel = (starts[..., :nsel, None] + torch.arange(bk, device=dev)).reshape(H, nb, kk)
        sel_ok = (torch.arange(kk, device=dev) // bk)[None, None] < count[..., None]
        sel_ok &= (sel >= S) & (sel < T) & (sel < (end - sw)[None, :, None])
        Tp = cdiv(T, bk) * bk  # starts are multiples of bk: gather whole blocks of bk keys
        pad = lambda x: torch.cat([x.new_zeros(Hkv, sw, D), x, x.new_zeros(Hkv, bq + Tp - T, D)], 1)
        kp, vp = pad(keys), pad(values)  # key j at row j + sw (the window of any block is a strided view)
        kblk = kp[:, sw : sw + Tp].reshape(Hkv * (Tp // bk), bk * D)
        vblk = vp[:, sw : sw + Tp].reshape(Hkv * (Tp // bk), bk * D)
        qp = q.new_zeros(H, nb * bq, D)
        qp[:, :L] = q
        qp = qp.view(Hkv, G, nb, bq, D).transpose(1, 2)  # [Hkv, nb, G, bq, D]
        q_pos = T - L + torch.arange(nb * bq, device=dev).view(nb, bq)
        res = q.new_empty(Hkv, nb, G, bq, D)
        step = max(1, tile_floats // (H * bq * (S + sw + kk + D)))
        for b0 in range(0, nb, step):
            b1 = min(nb, b0 + step)
            n = b1 - b0
            qt = qp[:, b0:b1].contiguous().mul_(self.scale)  # [Hkv, n, G, bq, D]
            pos = q_pos[b0:b1]  # [n, bq]
            win = lambda x: x.as_strided((Hkv, n, sw, D), (x.stride(0), bq * D, D, 1), (end[b0] - sw + sw) * D)
            kw, vw = win(kp), win(vp)  # [Hkv, n, sw, D]: keys end_b - sw .. end_b - 1
            blk = starts[:, b0:b1, :nsel].reshape(Hkv, G, n, nsel).transpose(1, 2)  # [Hkv, n, G, nsel]
            gi = (torch.arange(Hkv, device=dev)[:, None, None, None] * (Tp // bk)
                  + torch.div(blk, bk, rounding_mode="floor").clamp(0, Tp // bk - 1)).reshape(-1)
            ks_ = torch.index_select(kblk, 0, gi).view(Hkv, n, G, kk, D)
            vs_ = torch.index_select(vblk, 0, gi).view(Hkv, n, G, kk, D)
            l_sink = torch.matmul(qt.view(Hkv, n * G * bq, D), keys[:, :S].transpose(1, 2)).view(Hkv, n, G, bq, S)
            l_win = torch.matmul(qt.view(Hkv, n, G * bq, D), kw.transpose(2, 3)).view(Hkv, n, G, bq, sw)
            l_sel = torch.matmul(qt, ks_.transpose(3, 4))  # [Hkv, n, G, bq, kk]
            j_w = (end[b0:b1] - sw)[:, None] + torch.arange(sw, device=dev)  # [n, sw]
            l_sink.masked_fill_(~(torch.arange(S, device=dev) <= pos[:, :, None])[:, None], -math.inf)
            l_win.masked_fill_(~(((j_w >= S) & (j_w < T))[:, None] & (j_w[:, None] <= pos[:, :, None]))[:, None],
                               -math.inf)
            l_sel.masked_fill_(~sel_ok[:, b0:b1].reshape(Hkv, G, n, kk).transpose(1, 2)[:, :, :, None], -math.inf)
            m = torch.maximum(torch.maximum(l_sink.amax(-1, keepdim=True), l_win.amax(-1, keepdim=True)),
                              l_sel.amax(-1, keepdim=True) if kk else torch.full_like(l_sink[..., :1], -math.inf))
            e_sink, e_win, e_sel = (torch.exp_(x.sub_(m)) for x in (l_sink, l_win, l_sel))
            total = e_sink.sum(-1, keepdim=True) + e_win.sum(-1, keepdim=True) + e_sel.sum(-1, keepdim=True)
            o = torch.matmul(e_sink.view(Hkv, n * G * bq, S), values[:, :S]).view(Hkv, n, G, bq, D)
            o += torch.matmul(e_win.view(Hkv, n, G * bq, sw), vw).view(Hkv, n, G, bq, D)
            o += torch.matmul(e_sel, vs_)
            res[:, b0:b1] = o.div_(total)
        return res.transpose(1, 2).reshape(H, nb * bq, D)[:, :L]

    # -- accounting ------------------------------------------------------------------------------------------
    def _sparse_keys(self) -> int:
        p = self.params
        sink = (p["num_sink"] if p["num_sink"] is not None else cdiv(32, p["block_size_k"])) * p["block_size_k"]
        return sink + p["sliding_window_size"] + p["mask_k"]

    def memory_model(self, length: int, chunk: int, device: str) -> dict[str, int]:
        """Every token's K/V stays on the device (HiP selects, never evicts); a prompt call's dense queries see up
        to every earlier key, a sparse query sink + window + mask_k keys."""
        p = self.params
        dense = 0
        if p["dense_queries_exp"] != 0:  # a dense query's keys: fewer than the threshold of its call (<= at length)
            dqe = p["dense_queries_exp"]
            if dqe is None:
                dqe = int((math.log2(length / p["mask_k"] / 2) * p["mask_k"] + p["mask_k"]) * 3)
            dense = max(0, min(length, dqe))
        return {"device_tokens": length, "host_tokens": 0,
                "workspace_keys": max(min(length, self._sparse_keys()), dense)}

    def attended_keys(self, p: int) -> int:
        """Sparse: sink + window + mask_k keys (at most p + 1). A prompt query below the dense threshold of its call
        attends to all p + 1; the call is unknown here, so the threshold is taken at T = p + 1 (a lower bound)."""
        if self.params["dense_queries_exp"] != 0 and self.dense_queries(33, p + 1) == 33:
            return p + 1
        return min(p + 1, self._sparse_keys())
