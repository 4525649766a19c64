"""A slow, obviously-correct dense reference of InfLLM-V2's sparse attention, written from the spec
(shared/reference/methods-wave2.md section 1, "Dense reference"), not from the implementation.

It keeps the whole un-rotated K/V history and, for every query position t and KV group g, builds the key set
S(g, t) explicitly: the whole causal prefix when the call is dense (its last position + 1 < dense_len), otherwise the
keys <= t of the blocks I_g(t) chosen by steps 1-5 of the spec, each computed from its definition in fp64 with
Python loops: explicit kernel means for C1 / C2, explicit visibility (a kernel's last token <= t; with the quirk one
kernel fewer in a multi-token call ending at L = stride - 1 mod stride), explicit log-sum-exp, the sum over the
group's heads, the max over kernels [b*r - 1, b*r + r - 1] (-inf if none exists), +inf for the forced blocks, then
`topk + window_size // block_size` columns out of ceil(L / block_size) sorted by (score descending, index ascending),
dropping those after the query's block. One softmax per query head over S(g, t), rotated at true positions.
"""

from __future__ import annotations

import math

import torch

from infllm_eval.methods.base import ContextMethod

INF = float("inf")


class DenseInfLLMv2(ContextMethod):
    name = "dense-infllmv2-reference"
    chosen: list | None = None  # set to a list to record (t, g, sorted blocks) of every sparse query

    def new_state(self, layer_idx):
        return {"k": [], "v": [], "layer": layer_idx}

    def attend(self, st, q, k, v, pos, out=None):  # returns its own output (the engine copies it)
        p = self.params
        st["k"].append(k[0].clone()), st["v"].append(v[0].clone())  # k, v are engine buffers
        K_raw, V = torch.cat(st["k"], 1), torch.cat(st["v"], 1).double()  # [Hkv, N, D]
        Hkv, N, _ = K_raw.shape
        H, Lq = q.shape[1], q.shape[2]
        G = H // Hkv
        rot = lambda x, positions: self.rope.rotate(x[None].float(), torch.as_tensor(positions))[0].double()
        K = rot(K_raw, list(range(N)))
        K_sel = K_raw.double() if p["use_nope"] else K
        p0 = int(pos[0])
        L = p0 + Lq  # the call's last position + 1
        levels = [(p["kernel_size"], p["kernel_stride"]), (4 * p["kernel_size"], 4 * p["kernel_stride"])]
        C = [torch.stack([K_sel[:, s * j : s * j + ks].mean(dim=1) for j in range(N) if s * j + ks <= N]
                         + [K_sel.new_zeros(Hkv, K.shape[2])])[:-1] for ks, s in levels]  # [M, Hkv, D] each
        lag = [1 if p["quirk_15mod16"] and Lq > 1 and L % s == s - 1 else 0 for _, s in levels]
        out = torch.zeros(H, Lq, q.shape[3], dtype=torch.float64)
        for i in range(Lq):
            t = p0 + i
            q_rot = rot(q[0, :, i : i + 1], [t])[:, 0]  # [H, D]
            q_sel = q[0, :, i].double() if p["use_nope"] else q_rot
            for g in range(Hkv):
                if L < p["dense_len"]:
                    keys = list(range(t + 1))
                else:
                    blocks = self.blocks(t, L, q_sel[g * G : (g + 1) * G], [c[:, g] for c in C], lag)
                    if self.chosen is not None:
                        self.chosen.append((st["layer"], t, g, blocks))
                    keys = [j for j in range(t + 1) if j // p["block_size"] in blocks]
                for h in range(g * G, (g + 1) * G):
                    prob = torch.softmax(K[g, keys] @ q_rot[h] * self.scale, dim=0)
                    out[h, i] = prob @ V[g, keys]
        return out[None].to(q.dtype)

    def blocks(self, t, L, q_heads, C, lag):
        """I_g(t): the sorted blocks a query at t (in a call ending at L) attends, from its group's query heads
        q_heads [G, D] and the group's compressed keys C = [level 1 [M1, D], level 2 [M2, D]]."""
        p = self.params
        B, s = p["block_size"], p["kernel_stride"]
        levels = [(p["kernel_size"], s), (4 * p["kernel_size"], 4 * s)]
        visible = []
        for (ks, stride), c, lag_i in zip(levels, C, lag):
            vis = [j for j in range(len(c)) if stride * j + ks - 1 <= t]
            visible.append(vis[: max(0, len(vis) - lag_i)])
        M1 = len(C[0])
        S = [0.0] * M1
        for qh in q_heads:  # step 1 per head, step 2: sum over the group
            l1 = (C[0] @ qh * self.scale).tolist()
            if p["lse_mode"] == "coarse":
                l2 = (C[1] @ qh * self.scale).tolist()
                norm = [l2[j] for j in visible[1]]
            else:
                norm = [l1[j] for j in visible[0]]
            lse = math.log(sum(math.exp(x - max(norm)) for x in norm)) + max(norm) if norm else -INF
            for j in visible[0]:
                S[j] += math.exp(l1[j] - lse) if lse > -INF else 0.0
        if p["score_bf16"]:
            S = [float(torch.tensor(x, dtype=torch.float32).bfloat16()) for x in S]
        r = B // s
        qb = t // B
        n_cols = -(-L // B)
        local = p["window_size"] // B
        score = []
        for b in range(n_cols):  # step 3: max over the kernels the block's pooling window covers; step 4: forced
            window = [S[j] for j in range(b * r - 1, b * r + r) if 0 <= j < M1]
            forced = b < p["init_blocks"] or qb - local <= b <= qb
            score.append(INF if forced else max(window) if window else -INF)
        k_sel = min(p["topk"] + local, n_cols)  # step 5
        top = sorted(range(n_cols), key=lambda b: (-score[b], b))[:k_sel]
        return sorted(b for b in top if b <= qb)
