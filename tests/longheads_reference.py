"""A slow, obviously-correct dense reference of LongHeads, written from the spec (methods-wave2.md section 2).

It keeps every un-rotated q/k/v and, for each query position t and query head h, builds the key list and a position
vector of its own:
  t < B            : keys 0..t at their true positions, query at t;
  t >= B (decode)  : g = (t+1)//w complete chunks; chunks {0} + the top Kc-3 of 1..g-2 by q_t . R[h, c] (q un-rotated,
                     no scale; ties: lower chunk first; all of them when there are fewer) + {g-1}, then tokens g*w..t;
                     the keys in that order get positions 0..R-1, the query R-1;
  t >= B (quirk)   : qc = t//w; chunks {0} + top Kc-3 of 1..qc-2 + {qc-1}, then tokens qc*w..t-1; keys at 0..R-1,
                     the query at R (one past the last key);
and takes one softmax in fp64. R[h, c] follows the spec's four steps with plain loops. Used only in tests.
"""

from __future__ import annotations

import torch

from infllm_eval.methods.base import ContextMethod


class DenseLongHeads(ContextMethod):
    name = "dense-longheads-reference"

    def new_state(self, layer_idx):
        return {"q": [], "k": [], "v": [], "reps": {}}

    def _rot(self, x, positions):  # x [n, D] -> rotated at positions [n] (fp32 rotation, fp64 result)
        return self.rope.rotate(x[None, None].float(), torch.as_tensor(positions))[0, 0].double()

    def _rep(self, st, Q, K, V, h, G, c):
        """R[h, c]: in-chunk rotation, non-causal attention in the chunk, mean output, attention of it on the keys."""
        if (h, c) not in st["reps"]:
            w = self.params["window_size"]
            idx, offs = list(range(c * w, (c + 1) * w)), list(range(w))
            qt, kt = self._rot(Q[h, idx], offs), self._rot(K[h // G, idx], offs)
            o = torch.softmax(qt @ kt.T * self.scale, dim=-1) @ V[h // G, idx]  # [w, D]
            o_mean = o.mean(dim=0)
            st["reps"][(h, c)] = torch.softmax(kt @ o_mean * self.scale, dim=0) @ kt
        return st["reps"][(h, c)]

    def _keys(self, st, Q, K, V, h, G, t):
        """(key token indices, key positions, query position) of query head h at position t."""
        w, A, B = self.params["window_size"], self.params["atten_length"], self.params["begin_selective_length"]
        if t < B:
            return list(range(t + 1)), list(range(t + 1)), t
        quirk = self.params["prefill_self_exclusion"]
        last = t // w - 1 if quirk else (t + 1) // w - 1  # the last complete chunk (forced)
        middle = list(range(1, last))
        score = {c: float(Q[h, t] @ self._rep(st, Q, K, V, h, G, c)) for c in middle}
        top = sorted(middle, key=lambda c: (-score[c], c))[: A // w - 3]
        chunks = sorted({0, last} | set(top)) if last >= 0 else []
        keys = [j for c in chunks for j in range(c * w, (c + 1) * w)]
        keys += list(range((last + 1) * w, t if quirk else t + 1))  # the partial chunk
        return keys, list(range(len(keys))), len(keys) if quirk else len(keys) - 1

    def attend(self, st, q, k, v, pos, out=None):  # returns its own output (the engine copies it)
        for name, x in (("q", q), ("k", k), ("v", v)):
            st[name].append(x[0].double().clone())  # q, k, v are engine buffers
        Q, K, V = (torch.cat(st[name], dim=1) for name in ("q", "k", "v"))  # [H, N, D], [Hkv, N, D]
        H, G = Q.shape[0], Q.shape[0] // K.shape[0]
        res = torch.zeros(q.shape[1:], dtype=torch.float64)  # [H, L, D]
        for i, t in enumerate(pos.tolist()):
            for h in range(H):
                keys, kpos, qpos = self._keys(st, Q, K, V, h, G, t)
                lg = self._rot(K[h // G, keys], kpos) @ self._rot(Q[h, t : t + 1], [qpos])[0] * self.scale
                res[h, i] = torch.softmax(lg, dim=0) @ V[h // G, keys]
        return res[None].to(q.dtype)
