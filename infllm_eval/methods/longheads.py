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
rot(q, P)·rot(k, r*w + o) = rot(q, P - r*w)·k̃: per query tile, the union U of the chunks any head/query selected is
gathered once, the queries are rotated per (head, query, chunk) by P - rank*w, logits are one batched matmul per
(KV head, chunk), and non-selected (head, query, chunk) entries are masked before one joint softmax with the
partial-chunk stage. Work per tile is at most that of full attention over the same chunks.
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
        head (counted as 4 tokens: G/2 tokens' K/V for group size G <= 8) and the partial chunk's queries. A query
        tile is scored against the union of the chunks its heads selected: at worst every chunk."""
        w = self.params["window_size"]
        return {"device_tokens": length + 4 * (-(-length // w)) + w, "host_tokens": 0, "workspace_keys": length}

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
        """Chosen complete chunks per (head, query): bool [H, L, gmax]. Scores q·R, q un-rotated, no scale; chunk 0
        and g-1 forced; the rest by score descending, then chunk index ascending (stable sort)."""
        gmax = int(g[-1])
        sc = torch.einsum("hld,hcd->hlc", q.float(), st["reps"][:, :gmax])  # [H, L, gmax]
        c = torch.arange(gmax, device=q.device)
        valid = c < g[:, None]  # [L, gmax]
        sc = sc.masked_fill(~valid, -INF).masked_fill(valid & ((c == 0) | (c == g[:, None] - 1)), INF)
        top = torch.sort(sc, dim=-1, descending=True, stable=True).indices[..., : self.n_chunks]
        chosen = torch.zeros_like(sc, dtype=torch.bool).scatter_(-1, top, True)
        return chosen & valid

    def _selective(self, st: dict, q: torch.Tensor, t0: int, out: torch.Tensor) -> None:
        """Queries t0.. (all >= B): q [H, L, D] un-rotated -> out [H, L, D]."""
        w, H, L, D = self.w, *q.shape
        dev = q.device
        kl, vv = st["kv"].view()
        kl, vv = kl[0], vv[0]  # [Hkv, T, D]
        Hkv = kl.shape[0]
        G = H // Hkv
        t = torch.arange(t0, t0 + L, device=dev)
        g = t // w if self.quirk else (t + 1) // w  # candidate complete chunks
        ps, pe = g * w, t if self.quirk else t + 1  # the partial chunk's keys [ps, pe)
        n = g.clamp(max=self.n_chunks)  # selected complete chunks; the query sits at n*w + t - ps
        chosen = self._select(st, q, g)  # [H, L, gmax]
        gmax = chosen.shape[-1]
        rank = chosen.cumsum(-1) - 1  # rank of a chosen chunk in ascending order
        qs = (q.float() * self.scale).contiguous()  # [H, L, D]
        for s in range(0, L, self.q_tile):
            e = min(L, s + self.q_tile)
            tq = e - s
            u = chosen[:, s:e].any(dim=(0, 1)).nonzero()[:, 0]  # union of the tile's chunks [U]
            nu = u.numel()
            # full chunks: query of (head, query, chunk) rotated at P - rank*w = (n - rank)*w + t - ps
            ch = chosen[:, s:e, u].view(Hkv, G, tq, nu).permute(0, 3, 1, 2)  # [Hkv, U, G, tq]
            rel = (n[s:e] - rank[:, s:e, u].view(Hkv, G, tq, nu).permute(0, 3, 1, 2)) * w + (t - ps)[s:e]
            qt = qs[:, s:e].reshape(Hkv, 1, G, tq, D)
            a = self._rot(qt, rel.clamp(0, self.A + self.w - 1))  # [Hkv, U, G, tq, D]
            if int(u[-1]) == nu - 1:  # chunks 0..nu-1: a view, no copy
                ku, vu = kl[:, : nu * w].view(Hkv, nu, w, D), vv[:, : nu * w].view(Hkv, nu, w, D)
            else:
                ku = kl[:, : gmax * w].view(Hkv, gmax, w, D)[:, u]
                vu = vv[:, : gmax * w].view(Hkv, gmax, w, D)[:, u]
            lg = torch.bmm(a.reshape(Hkv * nu, G * tq, D), ku.float().reshape(Hkv * nu, w, D).transpose(1, 2))
            lg = lg.view(Hkv, nu, G, tq, w).masked_fill_(~ch[..., None], -INF)
            # partial chunk: keys [ps, pe) at offsets, query at t - ps: true distances
            a0, b0 = int(ps[s]), int(pe[e - 1])
            ql = self._rot(qt[:, 0], (t - ps)[s:e].clamp(min=0)).view(Hkv, G * tq, D)
            kp, vp = kl[:, a0:b0].float(), vv[:, a0:b0].float()  # [Hkv, S, D]
            lp = torch.matmul(ql, kp.transpose(1, 2)).view(Hkv, G, tq, b0 - a0)
            j = torch.arange(a0, b0, device=dev)
            lp.masked_fill_(~((j >= ps[s:e, None]) & (j < pe[s:e, None])), -INF)
            m = lg.amax(dim=(1, 4))  # [Hkv, G, tq]: finite, chunk 0 is always chosen
            if b0 > a0:
                m = torch.maximum(m, lp.amax(dim=-1))
            lg.sub_(m[:, None, ..., None]).exp_()
            lp.sub_(m[..., None]).exp_()
            den = lg.sum(dim=(1, 4)) + lp.sum(dim=-1)  # [Hkv, G, tq]
            o = torch.bmm(lg.view(Hkv * nu, G * tq, w), vu.float().reshape(Hkv * nu, w, D)).view(Hkv, nu, G * tq, D)
            o = o.sum(dim=1) + torch.matmul(lp.view(Hkv, G * tq, b0 - a0), vp)
            out[:, s:e] = (o.view(Hkv, G, tq, D) / den[..., None]).reshape(H, tq, D).to(out.dtype)
