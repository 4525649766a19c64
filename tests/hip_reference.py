"""A slow, scalar reference of HiP v1.0 (DeepAuto-AI/hip-attention @ fea42c77; spec: methods-wave2.md section 4,
plus the kernel arithmetic read in `masking_iteration.py` / `safe_indices.py` / `calc_prob_return_context.py`).

Per call: leading dense queries (prompt calls only), then per query head, query block and source grid a plain
Python replay of the hierarchical search with numpy float32 node locations and float64 products, one (head, block,
grid) at a time; then, per query, its key SET = sink U window U selected blocks, intersected with [0, pos], and one
fp64 softmax. Used only in tests.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from infllm_eval.methods.base import ContextMethod

f32 = np.float32


def cdiv(a, b):
    return -(-a // b)


def next_pow2(x):
    p = 1
    while p < x:
        p *= 2
    return p


class DenseHiP(ContextMethod):
    name = "dense-hip-reference"

    def new_state(self, layer_idx):
        return {"k": [], "v": []}

    def attend(self, st, q, k, v, pos, out=None):  # returns its own output
        p = self.params
        st["k"].append(k[0].clone()), st["v"].append(v[0].clone())
        K, V = torch.cat(st["k"], 1), torch.cat(st["v"], 1)  # [Hkv, T, D] un-rotated
        H, L, D = q.shape[1], q.shape[2], q.shape[3]
        Hkv, T = K.shape[0], K.shape[1]
        G_ = H // Hkv
        p0 = int(pos[0])
        Kr = self.rope.rotate(K[None].float(), torch.arange(T))[0].double()
        Qr = self.rope.rotate(q.float(), pos)[0].double()  # [H, L, D]
        V = V.double()
        # dense queries (prompt calls only)
        nd = 0
        if L > 32 and p["dense_queries_exp"] != 0:
            dqe = p["dense_queries_exp"]
            if dqe is None:
                dqe = int((math.log2(T / p["mask_k"] / 2) * p["mask_k"] + p["mask_k"]) * 3)
            if dqe > 0:
                nd = min(L, max(0, dqe - T + L))
        res = torch.zeros(H, L, D, dtype=torch.float64)
        for t in range(nd):
            for h in range(H):
                res[h, t] = self._softmax(Qr[h, t], Kr[h // G_], V[h // G_], list(range(p0 + t + 1)))
        Ls = L - nd
        if Ls:
            bq, bk = min(p["block_size_q"], next_pow2(Ls)), min(p["block_size_k"], next_pow2(T))
            num_sink = p["num_sink"] if p["num_sink"] is not None else cdiv(32, bk)
            S, sw = num_sink * bk, p["sliding_window_size"]
            qs = Qr[:, nd:]
            for h in range(H):
                for b in range(cdiv(Ls, bq)):
                    cols = self.select(qs[h], Kr[h // G_], b, bq, bk, T, Ls)
                    end = T - Ls + (b + 1) * bq
                    w0 = max(0, end - sw)
                    keyset = set(range(min(S, T))) | set(range(w0, min(T, w0 + sw)))
                    keyset |= {c + i for c in cols for i in range(bk) if S <= c + i < T}
                    for t in range(b * bq, min(Ls, (b + 1) * bq)):
                        ps = T - Ls + t
                        keys = sorted(j for j in keyset if j <= ps)
                        res[h, nd + t] = self._softmax(qs[h, t], Kr[h // G_], V[h // G_], keys)
        return res[None].to(q.dtype)

    def _softmax(self, qv, Kh, Vh, keys):
        lg = (Kh[keys] @ qv) * self.scale
        return torch.softmax(lg, 0) @ Vh[keys]

    def select(self, q, Kh, b, bq, bk, T, L):
        """Key block starts of query block b: q [L, D] (this head's sparse queries), Kh [T, D]."""
        p = self.params
        mask_k, s = p["mask_k"], p["scale_up"]
        w_start = p["w_start"] if p["w_start"] is not None else math.ceil(mask_k * s)
        n_patches = p["n_patches"] if p["n_patches"] is not None else math.ceil(mask_k / s)
        G = 1 if L > 32 else (p["ksrc_stride"] or min(32, max(1, round(mask_k / (bk * 16)))))
        lr = p["estimator_lower_resolution"] if cdiv(mask_k, bk) > p["estimator_lower_resolution_stop_n_blocks"] else 1
        mask_k, w_start, n_patches = mask_k // lr, w_start // lr, n_patches // lr
        sparq = p["enable_sparq"] and mask_k // bk >= p["sparq_start_bk"] and T >= p["sparq_start_tsrc"]
        dims_all = list(range(q.shape[1]))
        dims = [dims_all, dims_all]
        if sparq:
            tot = q[b * bq : (b + 1) * bq].abs().sum(0).tolist()
            order = sorted(dims_all, key=lambda d: -tot[d])  # stable: lower dim first on ties
            hid = p["sparq_hid"]
            dims = [order[: hid // 2 if hid > 16 else hid], order[:hid]]
        t_src = min(T, T - L + b * bq + max(bq, bk))
        w_curr = round(w_start / s)
        ws = min(t_src, w_curr)
        bws = f32(np.ceil(f32(ws) / f32(bk)))
        ks = int(np.ceil(bws / f32(G)))
        MK = cdiv(cdiv(mask_k, bk), G)
        TM = MK * math.ceil(s)
        NP = cdiv(cdiv(n_patches, bk), G)
        max_dup = next_pow2(math.ceil(s))
        c_sw = max(0, p["sliding_window_size"] - bq - bk)
        n_iter, w = 0, w_curr
        while w < T:
            w = round(w * s)
            n_iter += 1
        scorers = [(j, T - L + j) for j in range(b * bq, (b + 1) * bq, p["reduce_stride"]) if j < L]
        all_locs, total_k, ws_final = [], 0, ws
        for g in range(G):
            locs = [f32(f32(i) / f32(ks)) + f32(f32(g) * f32(f32(1) / bws)) for i in range(MK)]
            tmask = [f32(0)] * TM
            w_old, k_old, ws_out, ks_out = ws, ks, ws, ks
            for it in range(n_iter):
                w_new = min(math.floor(w_old * s + 0.5), t_src)
                if w_new == w_old:
                    continue
                b_old, b_new = float(cdiv(w_old, bk)), float(cdiv(w_new, bk))
                k_new = max(NP, int(min(MK / float(cdiv(t_src, bk)), 1.0) * b_new))
                k_new = min(cdiv(t_src, bk * G), k_new)
                ratio = b_new / b_old
                st, dup = [], []
                for j in range(MK):
                    a = int(float(locs[j]) * b_old)
                    st.append(int(a * ratio))
                    dup.append(int((a + 1) * ratio) - st[-1] if (j < k_old and locs[j] < 1.0) else 0)
                incl = list(np.cumsum(dup))
                npix = incl[-1]
                base = [incl[j] - (incl[0] if p["pixel_slot_quirk"] else dup[j]) for j in range(MK)]
                if not (k_new < npix or p["reduce_stride"] > 1):
                    for c in range(max_dup):
                        for j in range(MK):
                            slot = base[j] + c
                            if dup[j] and c <= dup[j] and slot < MK and slot < npix:
                                locs[slot] = f32((st[j] + c) / b_new)
                else:
                    for c in range(max_dup):
                        for j in range(MK):
                            if c < dup[j] and base[j] + c < TM:
                                tmask[base[j] + c] = f32((st[j] + c) / b_new)
                    cap = next_pow2(TM) if it == 0 else next_pow2(TM) // 2
                    ncand = min(npix, cap, TM)
                    dd = dims[0 if it == 0 else 1]
                    score = []
                    for sl in range(ncand):
                        r = int(float(tmask[sl]) * t_src)
                        r = min(max(r, 0), t_src - 1) // bk * bk
                        best = -math.inf
                        for j, ps in scorers:
                            for key in range(r, r + bk):
                                if key < T and key <= ps - c_sw:
                                    best = max(best, float(q[j, dd] @ Kh[key, dd]))
                        score.append(best)
                    if ncand:
                        kth = sorted(score, reverse=True)[min(k_new, ncand) - 1]
                        kept = [sl for sl in range(ncand) if score[sl] >= kth][:k_new]
                        for rank, sl in enumerate(kept):
                            locs[rank] = tmask[sl]
                k_old, w_old = min(k_new, npix), w_new
                if min(math.floor(w_new * s + 0.5), t_src) == w_new:
                    ws_out, ks_out = w_new, k_old
            all_locs += locs
            total_k += ks_out
            if g == 0:
                ws_final = ws_out
        if G > 1:
            all_locs = sorted(all_locs)
        all_locs = [x for x in all_locs for _ in range(lr)]
        total_k *= lr
        cols, last = [], -1
        for x in all_locs:
            c = int(np.ceil(f32(x * f32(ws_final)) / f32(bk)))
            last = max(last + 1, c)
            cols.append(last * bk)
        return cols[:total_k]
