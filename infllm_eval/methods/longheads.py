"""LongHeads (Lu et al., 2024, "LongHeads: Multi-Head Attention is Secretly a Long Context Processor",
arXiv 2402.10685; code `LuLuLuyi/LongHeads` @ 1c9f72e, `modeling_longheads/modeling_llama.py`,
`LlamaAttention.forward`).

The context is cut into chunks of `window_size` (w) tokens. Each complete chunk c gets, per query head h, a
representation R[h, c]: its keys and queries rotated at their in-chunk offsets (0..w-1), non-causal attention inside
the chunk, the mean of those outputs, ō, then R = softmax(ō·k̃/sqrt(d)) @ k̃ (a weighted mean of the chunk's rotated
keys). A query t >= `begin_selective_length` (B) scores the complete chunks by q_t·R[h, c], with the query
**un-rotated** and unscaled (as the original does), and each head attends to its own Kc - 1 = atten_length/w - 1
chunks: chunk 0 and the last complete chunk (forced) plus the top Kc - 3 others (ties: lower chunk index first),
then the current partial chunk up to t. Those keys are re-positioned contiguously in ascending chunk order: the
chunk of rank r sits at positions r*w..r*w+w-1, the partial chunk after the last one, and the query at the last
position, so no distance reaches atten_length (A). Queries t < B attend densely at true positions.

Decode semantics (the original's single-token branch) for every query: g = (t+1)//w complete chunks, forced 0 and
g-1, partial chunk g*w..t. `prefill_self_exclusion: true` reproduces the original's multi-token (prompt) branch
instead, for every query t >= B (the harness cannot tell the last prompt token from a decoding step, and the
original puts the whole prompt through that branch, so this is exact for every prompt token, including the one
whose logits give the first answer token, and differs from the original on generated tokens): chunks 0, t//w - 1
forced, the top Kc - 3 of 1..t//w - 2, the own chunk truncated to offsets < t mod w (the query does not see itself)
and the query one position past the last key. [inferred: the switch, its default false, and "every query"]

Departures / decisions:
- GQA (not in the original, which is MHA only) [inferred, the spec's proposal]: ō and R are computed per query head
  from its KV head's keys and values, and selection is per query head; the keys are shared within a KV group only
  where heads pick the same chunks.
- Fewer candidates than Kc - 3 (a short context with B < A - w) [inferred]: every complete chunk is taken (the
  original's top-k would fail); the query then attends every token at its true position.
- The original starts its decode branch at t + 1 >= B and its prompt branch at t >= B; here t >= B for both.
- Chunked prefill: the original's prompt branch cannot continue a cache; here representations are built as chunks
  complete, from the un-rotated queries of the still-partial chunk kept across calls.

Computation: keys are stored rotated at their in-chunk offsets (k̃). RoPE is relative, so
rot(q, P)·rot(k, r*w + o) = rot(q, P - r*w)·k̃: each query is rotated once per rank (Kc - 1 copies). Per query tile
one online softmax starts with the partial chunk (true distances) and takes one step per (KV head, chunk) over the
(head, query, rank) rows that chose that chunk: a [rows, w] matmul against its k̃, kept in cache. Work is that of the
chosen chunks only; with q_tile 256 it ran a little faster than full attention at 16K on SmolLM2's shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from infllm_eval.errors import UserError
from infllm_eval.methods import METHODS
from infllm_eval.methods.base import ContextMethod, KVBuffer
from infllm_eval.methods.kernels import INF, Stage, multi_stage_attention
from infllm_eval.rope import rotate_half


@METHODS.register("longheads")
class LongHeads(ContextMethod):
    name = "longheads"
    composes_rotations = True  # keys kept rotated at in-chunk offsets, rotated again by their chunk's start
    position_scheme = "per-head selected chunks re-positioned contiguously (query last, < atten_length); true below B"
    param_names = ("window_size", "atten_length", "begin_selective_length", "prefill_self_exclusion", "base",
                   "distance_scale")

    def validate(self) -> None:
        super().validate()
        p = self.params
        for key in ("window_size", "atten_length", "begin_selective_length"):
            if not isinstance(p[key], int) or isinstance(p[key], bool) or p[key] <= 0:
                raise UserError(f"method.params.{key} must be a positive integer, got {p[key]!r}.")
        w, a, b = p["window_size"], p["atten_length"], p["begin_selective_length"]
        if a % w or a < 3 * w:
            raise UserError(f"method.params.atten_length must be a multiple of window_size ({w}) of at least 3 "
                            f"chunks (chunk 0, the last complete chunk and the partial one), got {a}.")
        if b < w:
            raise UserError(f"method.params.begin_selective_length must be at least window_size ({w}): a query "
                            f"needs a complete chunk to select, got {b}.")
        if not isinstance(p["prefill_self_exclusion"], bool):
            raise UserError(f"method.params.prefill_self_exclusion must be true or false, got "
                            f"{p['prefill_self_exclusion']!r}.")

    def bind(self, model, spec) -> None:
        super().bind(model, spec)
        p = self.params
        self.w, self.A, self.B = p["window_size"], p["atten_length"], p["begin_selective_length"]
        self.n_chunks = self.A // self.w - 1  # complete chunks attended per head (Kc - 1)
        self.quirk = p["prefill_self_exclusion"]
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _cos_sin(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [A + w, D] (fp32) of positions 0..A+w-1: every position this method rotates at."""
        if device not in self._tables:
            probe = torch.empty(0, device=device)
            self._tables[device] = self.rope.cos_sin(torch.arange(self.A + self.w, device=device), probe)
        return self._tables[device]

    def _rot(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [..., D] fp32 rotated at positions idx (broadcast against x[..., 0])."""
        cos, sin = self._cos_sin(x.device)
        return x * cos[idx] + rotate_half(x) * sin[idx]

    def attended_keys(self, p: int) -> int:
        return p + 1 if p < self.params["begin_selective_length"] else min(
            p + 1, self.params["atten_length"] - self.params["window_size"] + (p + 1) % self.params["window_size"])

    def memory_model(self, length: int, chunk: int, device: str) -> dict[str, int]:
        """Every token's K/V stays (selection differs per query); on top, per chunk one representation per query
        head (counted as 4 tokens: G/2 tokens' K/V for group size G <= 8) and the partial chunk's queries. Per query
        tile: the partial chunk's logits (q_tile + w keys), the rank-rotated queries ((Kc - 1) x head_dim <=
        atten_length floats per query and head, for head_dim <= w) and one chunk's logits; below B, full
        attention's workspace over B keys."""
        p = self.params
        w, a, b, tile = p["window_size"], p["atten_length"], p["begin_selective_length"], p["q_tile"]
        return {"device_tokens": length + 4 * (-(-length // w)) + w, "host_tokens": 0,
                "workspace_keys": min(length, max(b, tile + 2 * w + a))}

    def new_state(self, layer_idx: int) -> dict:
        return {"kv": None, "q_pend": None, "reps": None, "n_reps": 0}

    def attend(self, state, q, k, v, pos, out=None):
        L, p0 = q.shape[2], int(pos[0])
        w = self.w
        if state["kv"] is None:
            state["kv"] = KVBuffer(k, capacity=max(1024, L))
        buf: KVBuffer = state["kv"]
        buf.append(self._rot(k.float(), pos % w).to(k.dtype), v)  # keys at their in-chunk offsets
        self._update_reps(state, q, p0 + L)
        out = q.new_empty(q.shape) if out is None else out
        nd = min(max(self.B - p0, 0), L)  # queries below B: dense at true positions
        if nd:
            kl, vv = buf.view()
            kt = self.rope.rotate(kl[:, :, : p0 + nd], torch.arange(p0 + nd, device=q.device) // w * w)
            stage = Stage(self.rope.rotate_range(q[:, :, :nd], p0), kt, vv[:, :, : p0 + nd], k_start=0, band=(0, INF))
            multi_stage_attention([stage], pos[:nd], self.scale, self.q_tile, self.fattn, out=out[:, :, :nd])
        if nd < L:
            self._selective(state, q[0, :, nd:], p0 + nd, out[0, :, nd:])
        return out

    def _update_reps(self, st: dict, q: torch.Tensor, p1: int) -> None:
        """Representations of the chunks completed by this call (their queries: the kept partial chunk + q)."""
        w, H, D = self.w, q.shape[1], q.shape[3]
        qc = q[0].float() if st["q_pend"] is None else torch.cat([st["q_pend"], q[0].float()], 1)  # [H, m, D]
        c0, n = st["n_reps"], p1 // w - st["n_reps"]
        if n > 0:
            kl, vv = st["kv"].view()
            Hkv = kl.shape[1]
            G = H // Hkv
            kk = kl[0, :, c0 * w : (c0 + n) * w].float().reshape(Hkv, n, w, D)  # k̃ [Hkv, n, w, D]
            vc = vv[0, :, c0 * w : (c0 + n) * w].float().reshape(Hkv, n, w, D)
            qt = self._rot(qc[:, : n * w].reshape(H, n, w, D), torch.arange(w, device=q.device))
            qt = qt.view(Hkv, G, n, w, D).transpose(1, 2).reshape(Hkv, n, G * w, D)  # q̃, a KV group's rows
            o = F.scaled_dot_product_attention(qt, kk, vc, scale=self.scale)  # non-causal within the chunk
            o_mean = o.view(Hkv, n, G, w, D).mean(dim=3)  # ō [Hkv, n, G, D]
            r = F.scaled_dot_product_attention(o_mean, kk, kk, scale=self.scale)  # R [Hkv, n, G, D]
            r = r.permute(0, 2, 1, 3).reshape(H, n, D)
            reps = st["reps"]
            if reps is None or reps.shape[1] < c0 + n:
                new = r.new_empty(H, max(c0 + n, 2 * (0 if reps is None else reps.shape[1]), 64), D)
                if reps is not None:
                    new[:, :c0] = reps[:, :c0]
                st["reps"] = reps = new
            reps[:, c0 : c0 + n] = r
            st["n_reps"] = c0 + n
        st["q_pend"] = qc[:, max(n, 0) * w :].clone()

    def _select(self, st: dict, q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Chosen complete chunks [H, L, min(Kc - 1, gmax)] in ascending order; slot r is real iff r < min(Kc - 1,
        g). Scores q·R, q un-rotated, no scale; chunks 0 and g-1 forced; the others by score descending, then chunk
        index ascending (stable sort)."""
        gmax = int(g[-1])
        sc = torch.einsum("hld,hcd->hlc", q.float(), st["reps"][:, :gmax])  # [H, L, gmax]
        c = torch.arange(gmax, device=q.device)
        valid = c < g[:, None]  # [L, gmax]
        sc = sc.masked_fill_(~valid, -INF).masked_fill_(valid & ((c == 0) | (c == g[:, None] - 1)), INF)
        top = torch.sort(sc, dim=-1, descending=True, stable=True).indices[..., : self.n_chunks]
        return top.sort(dim=-1).values  # chunks >= g (not real) sort after the real ones

    def _selective(self, st: dict, q: torch.Tensor, t0: int, out: torch.Tensor) -> None:
        """Queries t0.. (all >= B): q [H, L, D] un-rotated -> out [H, L, D]. Per query tile, one online softmax:
        started by the partial chunk (true distances), then one step per (KV head, chunk) over the (head, query,
        rank) rows that chose it: their queries rotated at P - rank*w times the chunk's k̃ (a matmul in cache)."""
        w, (H, L, D) = self.w, q.shape
        kl, vv = (x[0] for x in st["kv"].view())  # k̃, v [Hkv, T, D]
        Hkv, dev = kl.shape[0], q.device
        G = H // Hkv
        t = torch.arange(t0, t0 + L, device=dev)
        g = t // w if self.quirk else (t + 1) // w  # candidate complete chunks
        ps, pe = g * w, t if self.quirk else t + 1  # the partial chunk's keys [ps, pe)
        n = g.clamp(max=self.n_chunks)  # chunks chosen; the query sits at n*w + t - ps
        ids = self._select(st, q, g)  # [H, L, K1]
        K1, gmax = ids.shape[-1], int(g[-1])
        slot = torch.arange(K1, device=dev)
        key = (torch.arange(H, device=dev) // G * gmax)[:, None, None] + ids  # (KV head, chunk) of each row
        key.masked_fill_(slot >= n[:, None], Hkv * gmax)  # slots past n: no chunk
        rel = ((n[:, None] - slot) * w + (t - ps)[:, None]).clamp_(0, self.A - 1)  # [L, K1]: P - rank*w
        qs = (q.float() * self.scale).contiguous()  # [H, L, D]
        for s in range(0, L, self.q_tile):
            e = min(L, s + self.q_tile)
            tq = e - s
            # the partial chunk: keys [ps, pe) at their offsets, the query at t - ps: true distances
            a0, b0 = int(ps[s]), int(pe[e - 1])
            m = qs.new_full((H * tq,), -1e30)  # running max (finite: a row may see no partial key)
            den, acc = qs.new_zeros(H * tq), qs.new_zeros(H * tq, D)
            if b0 > a0:
                ql = self._rot(qs[:, s:e], (t - ps)[s:e].clamp(min=0)).view(Hkv, G * tq, D)
                lp = torch.matmul(ql, kl[:, a0:b0].float().transpose(1, 2)).view(H, tq, b0 - a0)
                j = torch.arange(a0, b0, device=dev)
                lp.masked_fill_(~((j >= ps[s:e, None]) & (j < pe[s:e, None])), -INF)
                m = torch.maximum(m, lp.amax(dim=-1).view(-1))
                lp = lp.sub_(m.view(H, tq, 1)).exp_()
                den = lp.sum(dim=-1).view(-1)
                acc = torch.matmul(lp.view(Hkv, G * tq, b0 - a0), vv[:, a0:b0].float()).view(H * tq, D)
            # complete chunks: rows (head, query, rank) grouped by (KV head, chunk)
            a = self._rot(qs[:, s:e, None], rel[s:e]).view(-1, D)  # [H * tq * K1, D]
            kt = key[:, s:e].reshape(-1)
            order = torch.argsort(kt, stable=True)
            counts = torch.bincount(kt, minlength=Hkv * gmax + 1)[:-1].tolist()
            off = 0
            for kc, cnt in enumerate(counts):
                if not cnt:
                    continue
                rows = order[off : off + cnt]
                off += cnt
                ht = rows // K1  # head * tq + query: unique within a chunk
                kv, c = divmod(kc, gmax)
                lg = torch.matmul(a[rows], kl[kv, c * w : (c + 1) * w].float().T)  # [cnt, w]
                m_old = m[ht]
                m_new = torch.maximum(m_old, lg.amax(dim=-1))
                alpha = m_old.sub_(m_new).exp_()
                lg = lg.sub_(m_new[:, None]).exp_()
                den[ht] = den[ht] * alpha + lg.sum(dim=-1)
                acc[ht] = acc[ht] * alpha[:, None] + torch.matmul(lg, vv[kv, c * w : (c + 1) * w].float())
                m[ht] = m_new
            out[:, s:e] = (acc / den[:, None]).view(H, tq, D).to(out.dtype)
