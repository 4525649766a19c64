"""A slow, obviously-correct dense reference of SnapKV as kvpress implements it, written from the spec
(shared/reference/methods-wave2.md section 5, "SnapKV (kvpress)"), not from the implementation: the key sets and
attention of press_reference.DensePress, with the score of the spec's steps 1-6 by plain loops in fp64:
per query head, each of the last W context queries (position n - W + i) takes one softmax over the keys 0 .. its
position; the probabilities of keys < n - W are averaged over the W queries; a zero-padded average of k neighbours
(offsets -k//2 .. k//2, divided by k) per key; the mean over the KV group's query heads; the W window keys score the
maximum + 1. A head keeps max(n_keep(n), W) keys (the window always; the harness's decision), none dropped when n <= W.
"""

from __future__ import annotations

import torch
from press_reference import DensePress


class DenseSnapKV(DensePress):
    name = "dense-snapkv-reference"

    def n_keep(self, n):
        return max(super().n_keep(n), min(self.params["window_size"], n))

    def scores(self, Q, K, n):
        W, ks = self.params["window_size"], self.params["kernel_size"]
        H, Hkv = Q.shape[0], K.shape[0]
        G, m = H // Hkv, n - W  # m: keys scored
        Kr = self.rot(K, list(range(n)))
        a = torch.zeros(H, m, dtype=torch.float64)
        for h in range(H):
            for i in range(W):
                t = n - W + i
                qt = self.rot(Q[h, t : t + 1], [t])[0]
                prob = torch.softmax(Kr[h // G, : t + 1] @ qt * self.scale, dim=0)
                a[h] += prob[:m] / W
        pooled = torch.zeros(H, m, dtype=torch.float64)
        for j in range(m):
            for o in range(-(ks // 2), ks // 2 + 1):
                if 0 <= j + o < m:
                    pooled[:, j] += a[:, j + o] / ks
        s = torch.stack([pooled[g * G : (g + 1) * G].mean(dim=0) for g in range(Hkv)])  # [H_kv, m]
        return torch.cat([s, torch.full((Hkv, W), float(s.max()) + 1, dtype=torch.float64)], dim=1)
