"""A slow, obviously-correct dense reference of Quest, written from the spec (shared/reference/methods-wave2.md
section 5, "Quest"), not from the implementation.

It keeps every un-rotated q/k/v and, for each query position t and query head h (KV head g), builds S(h, t):
  a dense layer (index < dense_layers; with layer_id_from_32 the index is i + 32 - n_layers), or t < n (the context,
  before `end_context`):  {0 .. t};
  otherwise: pages p = 0 .. ceil((t+1)/c) - 1 of c = chunk_size tokens, each with min_d / max_d over its keys <= t
  (rotated at true positions); U(p) = sum_d max(q_d min_d, q_d max_d) with q rotated at t, no scale; the
  min(max(3, budget // c), #pages) pages of highest U (ties: lower page), budget = token_budget (with
  clamp_budget_to_length: min(t + 1, token_budget)); S = their tokens <= t.
One softmax per query head over S in fp64, keys at true positions. Loops over pages and dimensions, no vectorised
bounds. Used only in tests.
"""

from __future__ import annotations

import torch

from infllm_eval.methods.base import ContextMethod


class DenseQuest(ContextMethod):
    name = "dense-quest-reference"
    chosen: list | None = None  # set to a list to record (layer, t, h, sorted pages)

    def new_state(self, layer_idx):
        return {"layer": layer_idx, "q": [], "k": [], "v": [], "selective": False}

    def end_context(self, states):
        for st in states:
            st["selective"] = True

    def rot(self, x, positions):
        return self.rope.rotate(x.float(), torch.as_tensor(positions)).double()

    def pages(self, Kr, qt, t):
        """The chosen pages of one query head: Kr [N, D] its KV head's rotated keys, qt [D] rotated at t."""
        p = self.params
        c = p["chunk_size"]
        n_pages = (t + c) // c  # ceil((t + 1) / c)
        U = []
        for pg in range(n_pages):
            ks = Kr[pg * c : min((pg + 1) * c, t + 1)]
            U.append(sum(max(float(qt[d]) * float(ks[:, d].min()), float(qt[d]) * float(ks[:, d].max()))
                          for d in range(Kr.shape[1])))
        budget = min(t + 1, p["token_budget"]) if p["clamp_budget_to_length"] else p["token_budget"]
        k = min(max(3, budget // c), n_pages)
        return sorted(sorted(range(n_pages), key=lambda pg: (-U[pg], pg))[:k])

    def attend(self, st, q, k, v, pos, out=None):  # returns its own output (the engine copies it)
        p = self.params
        for name, x in (("q", q), ("k", k), ("v", v)):
            st[name].append(x[0].double().clone())  # q, k, v are engine buffers
        Q, K, V = (torch.cat(st[name], dim=1) for name in ("q", "k", "v"))  # [H, N, D], [Hkv, N, D]
        N, H, G = K.shape[1], Q.shape[0], Q.shape[0] // K.shape[0]
        Kr = self.rot(K, list(range(N)))
        layer_id = st["layer"] + (32 - self.spec.n_layers if p["layer_id_from_32"] else 0)
        dense = layer_id < p["dense_layers"] or not st["selective"]
        res = torch.zeros(q.shape[1:], dtype=torch.float64)
        for i, t in enumerate(pos.tolist()):
            qt = self.rot(Q[:, t : t + 1], [t])[:, 0]  # [H, D]
            for h in range(H):
                g = h // G
                if dense:
                    keys = list(range(t + 1))
                else:
                    chosen = self.pages(Kr[g], qt[h], t)
                    if self.chosen is not None:
                        self.chosen.append((st["layer"], t, h, chosen))
                    keys = [j for j in range(t + 1) if j // p["chunk_size"] in chosen]
                prob = torch.softmax(Kr[g, keys] @ qt[h] * self.scale, dim=0)
                res[h, i] = prob @ V[g, keys]
        return res[None].to(q.dtype)
