"""The part the dense references of kvpress's presses (SnapKV, H2O) share, written from the spec
(shared/reference/methods-wave2.md section 5, "Dense reference (SnapKV and H2O)"), not from the implementation.

It keeps every un-rotated q/k/v and, per query position t and query head h of KV head g, the key set
  before the compression (the context, t < n):  S(h, t) = {0 .. t};
  after it (t >= n):                             S(h, t) = kept_g  ∪  {n .. t};
every key rotated at its true position, the query at t, one softmax in fp64. At `end_context` each layer's context of
n tokens gets its per-KV-head kept set: the n_keep(n) context positions of highest score (`scores`, from the
subclass), ties to the lower position, where n_keep is int(n * (1 - compression_ratio)) or min(kept_tokens, n).
Used only in tests.
"""

from __future__ import annotations

import torch

from infllm_eval.methods.base import ContextMethod


class DensePress(ContextMethod):
    kept: list | None = None  # set to a list to record (layer, kept sets [H_kv][sorted positions])

    def new_state(self, layer_idx):
        return {"layer": layer_idx, "q": [], "k": [], "v": [], "n": None, "kept": None}

    def rot(self, x, positions):  # x [..., n, D] -> rotated at positions (fp32 rotation, fp64 result)
        return self.rope.rotate(x.float(), torch.as_tensor(positions)).double()

    def n_keep(self, n):
        r, k = self.params["compression_ratio"], self.params["kept_tokens"]
        return int(n * (1 - r)) if k is None else min(k, n)

    def scores(self, Q, K, n):
        """[H_kv][n] scores of the n context keys from the un-rotated Q [H, n, D], K [H_kv, n, D] (fp64)."""
        raise NotImplementedError

    def end_context(self, states):
        for st in states:
            n = sum(x.shape[1] for x in st["k"])
            st["n"] = n
            if n == 0:
                continue
            Q, K = torch.cat(st["q"], 1), torch.cat(st["k"], 1)
            keep = self.n_keep(n)
            if keep >= n:
                st["kept"] = [list(range(n)) for _ in range(K.shape[0])]
            else:
                s = self.scores(Q, K, n)
                st["kept"] = [sorted(sorted(range(n), key=lambda j: (-float(sg[j]), j))[:keep]) for sg in s]
            if self.kept is not None:
                self.kept.append((st["layer"], st["kept"]))

    def attend(self, st, q, k, v, pos, out=None):  # returns its own output (the engine copies it)
        for name, x in (("q", q), ("k", k), ("v", v)):
            st[name].append(x[0].double().clone())  # q, k, v are engine buffers
        Q, K, V = (torch.cat(st[name], dim=1) for name in ("q", "k", "v"))  # [H, N, D], [Hkv, N, D]
        N, H, G = K.shape[1], Q.shape[0], Q.shape[0] // K.shape[0]
        Kr = self.rot(K, list(range(N)))  # every key at its true position
        res = torch.zeros(q.shape[1:], dtype=torch.float64)  # [H, L, D]
        for i, t in enumerate(pos.tolist()):
            qt = self.rot(Q[:, t : t + 1], [t])[:, 0]  # [H, D]
            for h in range(H):
                g = h // G
                keys = list(range(t + 1)) if st["n"] is None else st["kept"][g] + list(range(st["n"], t + 1))
                prob = torch.softmax(Kr[g, keys] @ qt[h] * self.scale, dim=0)
                res[h, i] = prob @ V[g, keys]
        return res[None].to(q.dtype)
