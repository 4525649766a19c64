"""A slow, obviously-correct dense reference of H2O as kvpress implements it (`ObservedAttentionPress`), written from
the spec (shared/reference/methods-wave2.md section 5), not from the implementation: the key sets and attention of
press_reference.DensePress, with the score by plain loops in fp64: per query head h, the full causal attention
A[h, i, j] of every context query i (one softmax over keys 0 .. i), score_j = sum_i A[h, i, j] / (n - j), then the
mean over the KV group's query heads. No window protection.
"""

from __future__ import annotations

import torch
from press_reference import DensePress


class DenseH2O(DensePress):
    name = "dense-h2o-reference"

    def scores(self, Q, K, n):
        H, Hkv = Q.shape[0], K.shape[0]
        G = H // Hkv
        Kr, Qr = self.rot(K, list(range(n))), self.rot(Q, list(range(n)))
        col = torch.zeros(H, n, dtype=torch.float64)
        for h in range(H):
            for i in range(n):
                col[h, : i + 1] += torch.softmax(Kr[h // G, : i + 1] @ Qr[h, i] * self.scale, dim=0)
        score = col / torch.tensor([n - j for j in range(n)], dtype=torch.float64)
        return [score[g * G : (g + 1) * G].mean(dim=0) for g in range(Hkv)]
