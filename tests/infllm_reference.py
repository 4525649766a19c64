"""A slow, obviously-correct dense reference of InfLLM's math (reference code HEAD, correct masking).

It keeps the whole un-rotated K/V history and, for every query, builds its key set explicitly:
  local   : tokens j with 0 <= i - j < n_local, RoPE at their true positions (query at i)
  global  : the initial tokens, the tokens of the selected units, and the remainder tokens with i - j >= n_local
            (without the fix: every remainder token before b1 - n_local), all un-rotated, query rotated at n_local-1
and takes ONE softmax over the concatenation. Representative scores, unit packing and retrieval follow the
reference's bookkeeping with plain Python loops. Used only in tests.

Retrieval (spec: infllm.md §2.3b, §2.9): with more units than topk, unit u scores <mean global query, repr_u> per
query head; the heads' scores are summed (`head_reduce` max: their maximum) and the topk best units serve every
head, or with `perhead` each head takes its own topk best by its own score. Equal scores: the lower unit (token)
index first, for units and for representative tokens alike (the harness's rule; the reference's torch.topk orders
ties arbitrarily). `chunk_topk_calc` (a forward call of more than one token only): at the start of every
`chunk_topk_calc // exc_block_size` execution blocks of the call, the selections of all of them are made at once
from the units that exist then; units packed later in that group are not candidates until the next group, and
"no more units than topk" means every unit existing then.
"""

from __future__ import annotations

import torch

from infllm_eval.methods.base import ContextMethod


class DenseInfLLM(ContextMethod):
    name = "dense-infllm-reference"

    def new_state(self, layer_idx):
        return {"k": [], "v": [], "score": None, "units": [], "init_len": 0, "rem_st": 0}

    def attend(self, st, q, k, v, pos, out=None):  # returns its own output (the engine copies it)
        p = self.params
        n_local, n_init, bs, topk, r, E = (p["n_local"], p["n_init"], p["block_size"], p["topk"], p["repr_topk"],
                                           p["exc_block_size"])
        fix = p.get("prefill_mask_fix", True)
        H, Hkv = q.shape[1], k.shape[1]
        G = H // Hkv
        st["k"].append(k[0].clone()), st["v"].append(v[0].clone())  # k, v are engine buffers
        K, V = torch.cat(st["k"], dim=1).double(), torch.cat(st["v"], dim=1).double()  # [Hkv, N, D]
        N = K.shape[1]
        if st["score"] is None:
            st["score"] = torch.zeros(H, 0, dtype=torch.float64)
        st["score"] = torch.cat([st["score"], torch.zeros(H, N - st["score"].shape[1], dtype=torch.float64)], 1)
        dist = torch.tensor([n_local - 1])
        rot = lambda x, positions: self.rope.rotate(x[None].float(), torch.as_tensor(positions))[0].double()
        out = torch.zeros(q.shape[1:], dtype=torch.float64)  # [H, L, D]
        p0, L = int(pos[0]), q.shape[2]
        ctc = p.get("chunk_topk_calc")
        group = (ctc // E) * E if ctc is not None and L > 1 else E  # tokens whose selections are made together
        best = lambda scores, n: sorted(range(len(scores)), key=lambda u: (-scores[u], u))[:n]  # ties: lower first

        def select(qg_block, n_units):  # -> the units every query head attends (one list per head)
            if n_units <= topk:
                return [list(range(n_units))] * H
            qm = qg_block.mean(dim=1)  # [H, D]
            per_head = [[float(x) for x in (qm * rep).sum(dim=-1)] for _, rep in st["units"][:n_units]]  # [U][H]
            if p.get("perhead"):
                return [sorted(best([s[h] for s in per_head], topk)) for h in range(H)]
            s = [max(x) if p.get("head_reduce") == "max" else sum(x) for x in per_head]
            return [sorted(best(s, topk))] * H

        planned = {}
        for b0 in range(p0, p0 + L, E):
            b1 = min(p0 + L, b0 + E)
            if (b0 - p0) % group == 0:  # plan this block and the next ones of its group with today's units
                n_units = len(st["units"])
                for c0 in range(b0, min(p0 + L, b0 + group), E):
                    c1 = min(p0 + L, c0 + E)
                    planned[c0] = select(rot(q[0, :, c0 - p0 : c1 - p0], dist), n_units)
            sel = planned.pop(b0)
            qb = q[0, :, b0 - p0 : b1 - p0]
            qg = rot(qb, dist)  # [H, Eb, D]
            for i in range(b0, b1):
                qi_loc = rot(qb[:, i - b0 : i - b0 + 1], [i])[:, 0]  # [H, D]
                qi_glob = qg[:, i - b0]
                loc = list(range(max(0, i - n_local + 1), i + 1))
                rem = [j for j in range(st["rem_st"], b1 - n_local) if (i - j >= n_local or not fix)]
                for h in range(H):
                    glob = list(range(st["init_len"]))
                    for u in sel[h]:
                        glob += list(range(st["units"][u][0], st["units"][u][0] + bs))
                    glob += rem
                    kh, vh = K[h // G], V[h // G]
                    k_loc = rot(kh[loc][None], loc)[0]
                    logits = [k_loc @ qi_loc[h]]
                    if glob:
                        logits.append(kh[glob] @ qi_glob[h])
                    lg = torch.cat(logits) * self.scale
                    prob = torch.softmax(lg, dim=0)
                    out[h, i - p0] = prob @ torch.cat([vh[loc], vh[glob]])
                    st["score"][h, loc] += prob[: len(loc)]
            # append_global: initial tokens, then full units
            rem_len = b1 - st["rem_st"]
            if st["init_len"] < n_init and rem_len > n_local:
                n = min(n_init - st["init_len"], rem_len - n_local)
                st["init_len"] += n
                st["rem_st"] += n
                rem_len -= n
            while rem_len - bs >= n_local:
                s0 = st["rem_st"]
                rep = torch.zeros(H, K.shape[2], dtype=torch.float64)
                for h in range(H):
                    sc = st["score"][h, s0 : s0 + bs].tolist()
                    top = [s0 + j for j in best(sc, r)]
                    rep[h] = K[h // G, top].mean(dim=0)
                st["units"].append((s0, rep))
                st["rem_st"] += bs
                rem_len -= bs
        return out[None].to(q.dtype)


class DenseWindow(ContextMethod):
    """Dense per-query reference of the two window baselines: query i attends to j in [i-n_local+1, i] at true
    distance, and to initial tokens j < n_init with i - j >= n_local placed as the method says
    (`scheme` "in-cache": key j at position j, query at n_local+n_init-1; "ceiling": key at 0, query at n_local-1)."""

    name = "dense-window-reference"

    def new_state(self, layer_idx):
        return {"k": [], "v": []}

    def attend(self, st, q, k, v, pos, out=None):  # returns its own output (the engine copies it)
        n_local, n_init, scheme = self.params["n_local"], self.params["n_init"], self.params["scheme"]
        st["k"].append(k[0].clone()), st["v"].append(v[0].clone())  # k, v are engine buffers
        K, V = torch.cat(st["k"], 1), torch.cat(st["v"], 1)
        H, Hkv = q.shape[1], K.shape[0]
        rot = lambda x, positions: self.rope.rotate(x[None].float(), torch.as_tensor(positions))[0].double()
        q_at = n_local + n_init - 1 if scheme == "in-cache" else n_local - 1
        out = torch.zeros(q.shape[1:], dtype=torch.float64)
        for t, i in enumerate(pos.tolist()):
            loc = list(range(max(0, i - n_local + 1), i + 1))
            glob = [j for j in range(min(n_init, i + 1)) if i - j >= n_local]
            for h in range(H):
                kh, vh = K[h // (H // Hkv)], V[h // (H // Hkv)]
                lg = rot(kh[loc][None], loc)[0] @ rot(q[0, h : h + 1, t : t + 1], [i])[0, 0]
                if glob:
                    kpos = glob if scheme == "in-cache" else [0] * len(glob)
                    lg = torch.cat([lg, rot(kh[glob][None], kpos)[0] @ rot(q[0, h : h + 1, t : t + 1], [q_at])[0, 0]])
                prob = torch.softmax(lg * self.scale, 0)
                out[h, t] = prob @ torch.cat([vh[loc], vh[glob]]).double()
        return out[None].to(q.dtype)
