"""Quest (Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference", arXiv
2406.10774). Source: mit-han-lab/Quest @ 01c1623, `evaluation/quest_attention.py` (`forward`,
`local_heavy_hitter_mask`, `enable_quest_attention_eval`). Spec: shared/reference/methods-wave2.md section 5.

Every key is kept, rotated once at its true position, in pages of `chunk_size` tokens from position 0 (the
original's name for the page size; not the engine's prefill `chunk_size`). Each page has per-dimension bounds
min_k k_d and max_k k_d over its keys up to the query (a partial last page uses the keys it has). A selective query
at position t, per query head h (its KV head's pages; the original repeats K/V per query head):
1. U(page) = sum_d max(q_d * min_d, q_d * max_d), q rotated at t, no scaling (the original's sign trick);
2. the top min(max(3, token_budget // chunk_size), #pages) pages (ties: lower page first; CUDA's top-k leaves them
   unspecified), with no forced page (the query's own page usually wins through its own key);
3. softmax attention (scale 1/sqrt(d)) over the tokens <= t of those pages, at true positions.
Layers below `dense_layers` (the original's hard-coded 2) and every non-selective query attend causally in full.

Which queries are selective: the original selects in every one-token forward (`q_len == 1`) and prefills the prompt
in one dense forward (its passkey script then feeds the question one token at a time, selectively). Here [inferred]:
the context (prompt[:-1]) is dense whatever the prefill chunk size, and every query from the last prompt token on
(the calls after `end_context`, base.py) is selective, so outputs do not depend on `chunk_size` (with chunk 1 a
one-token rule would make the whole prefill selective).

Bugs of the original, as switches (default off):
- `layer_id_from_32`: `enable_quest_attention_eval` numbers layers down from a global 32, so on a model with L != 32
  layers layer i gets id i + 32 - L and the dense layers are those with i + 32 - L < dense_layers (none on SmolLM2's
  30 layers, three on a 33-layer model).
- `clamp_budget_to_length`: the original takes min(kv_len, token_budget) before dividing by the page size, so while
  the keys are fewer than the budget it keeps max(3, kv_len // chunk_size) pages: one page fewer than all of them
  whenever kv_len is not a multiple of the page (a budget that covers the input is then not full attention).
"""

from __future__ import annotations

import torch

from infllm_eval.errors import UserError
from infllm_eval.methods import METHODS
from infllm_eval.methods.base import ContextMethod, KVBuffer
from infllm_eval.methods.kernels import INF, Stage, multi_stage_attention


@METHODS.register("quest")
class Quest(ContextMethod):
    name = "quest"
    position_scheme = "true"
    param_names = ("chunk_size", "token_budget", "dense_layers", "layer_id_from_32", "clamp_budget_to_length",
                   "base", "distance_scale")

    def validate(self) -> None:
        super().validate()
        p = self.params
        for key, lo in (("chunk_size", 1), ("token_budget", 1), ("dense_layers", 0)):
            x = p[key]
            if isinstance(x, bool) or not isinstance(x, int) or x < lo:
                raise UserError(f"method.params.{key} must be an integer >= {lo}, got {x!r}.")
        for key in ("layer_id_from_32", "clamp_budget_to_length"):
            if not isinstance(p[key], bool):
                raise UserError(f"method.params.{key} must be true or false, got {p[key]!r}.")

    def bind(self, model, spec) -> None:
        super().bind(model, spec)
        self.page, self.budget = self.params["chunk_size"], self.params["token_budget"]

    def _dense_layer(self, i: int) -> bool:
        layer_id = i + 32 - self.spec.n_layers if self.params["layer_id_from_32"] else i
        return layer_id < self.params["dense_layers"]

    def new_state(self, layer_idx: int) -> dict:
        # kmin / kmax: page bounds [H_kv, pages, D] fp32, valid for the keys [0, bounded)
        return {"dense": self._dense_layer(layer_idx), "selective": False, "kv": None, "kmin": None, "kmax": None,
                "bounded": 0}

    def end_context(self, states: list) -> None:
        for st in states:
            st["selective"] = True
        self.context_len = 0 if not states or states[0]["kv"] is None else states[0]["kv"].len

    def attend(self, state, q, k, v, pos, out=None):
        p0, L = int(pos[0]), q.shape[2]
        q = self.rope.rotate_range(q, p0)
        k = self.rope.rotate_range(k, p0)
        if state["kv"] is None:
            state["kv"] = KVBuffer(k, capacity=max(1024, L))
        buf: KVBuffer = state["kv"]
        buf.append(k, v)
        keys, values = buf.view()
        if state["dense"] or not state["selective"]:
            stage = Stage(q, keys, values, k_start=0, band=(0, INF))
            out, _ = multi_stage_attention([stage], q_pos=pos, scale=self.scale, q_tile=self.q_tile,
                                           fused=self.fattn, out=out)
            return out
        out = q.new_empty(q.shape) if out is None else out
        for i in range(L):  # one query per call from the engine; a longer call keeps each query causal
            out[0, :, i] = self._select_attend(state, q[0, :, i], p0 + i).to(out.dtype)
        return out

    def _bounds(self, st: dict, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Page bounds over the keys [0, T) (T never decreases): the pages from the first one not yet complete."""
        P, pg = -(-T // self.page), self.page
        keys = st["kv"].k[0]  # [H_kv, cap, D]
        if st["kmin"] is None or st["kmin"].shape[1] < P:
            cap = max(P, 64, 0 if st["kmin"] is None else 2 * st["kmin"].shape[1])
            for name in ("kmin", "kmax"):
                new = keys.new_zeros(keys.shape[0], cap, keys.shape[2], dtype=torch.float32)
                if st[name] is not None:
                    new[:, : st[name].shape[1]] = st[name]
                st[name] = new
        a = st["bounded"] // pg  # first stale page
        x = keys[:, a * pg : T].float()
        full = x.shape[1] // pg
        if full:
            blocks = x[:, : full * pg].unflatten(1, (full, pg))
            st["kmin"][:, a : a + full], st["kmax"][:, a : a + full] = blocks.amin(dim=2), blocks.amax(dim=2)
        if x.shape[1] > full * pg:
            st["kmin"][:, a + full], st["kmax"][:, a + full] = x[:, full * pg :].amin(1), x[:, full * pg :].amax(1)
        st["bounded"] = T
        return st["kmin"][:, :P], st["kmax"][:, :P]

    def _select_attend(self, st: dict, q: torch.Tensor, t: int) -> torch.Tensor:
        """q [H, D] rotated at t -> output [H, D] (fp32) over the chosen pages' keys <= t."""
        T, pg = t + 1, self.page
        kmin, kmax = self._bounds(st, T)  # [H_kv, P, D]
        Hkv, P, D = kmin.shape
        G = q.shape[0] // Hkv
        qg = q.float().view(Hkv, G, 1, D)
        u = torch.maximum(qg * kmin[:, None], qg * kmax[:, None]).sum(dim=-1)  # U [H_kv, G, P]
        budget = min(T, self.budget) if self.params["clamp_budget_to_length"] else self.budget
        n_pages = min(max(3, budget // pg), P)
        top = torch.sort(u, dim=-1, descending=True, stable=True).indices[..., :n_pages]  # [H_kv, G, n_pages]
        tok = (top[..., None] * pg + torch.arange(pg, device=q.device)).flatten(2)  # [H_kv, G, n_pages * pg]
        valid = tok < T
        tok = tok.clamp_(max=T - 1)
        heads = torch.arange(Hkv, device=q.device)[:, None, None]
        keys, values = (x[0] for x in st["kv"].view())  # [H_kv, T, D]
        lg = torch.einsum("hgd,hgkd->hgk", qg[:, :, 0], keys[heads, tok].float()) * self.scale
        prob = lg.masked_fill_(~valid, -INF).softmax(dim=-1)
        return torch.einsum("hgk,hgkd->hgd", prob, values[heads, tok].float()).reshape(Hkv * G, D)

    # -- accounting ----------------------------------------------------------------------------------------------
    context_len: int | None = None  # the last sample's context length (set at end_context)

    def attended_keys(self, p: int) -> int:
        """Causal below the context end and in the dense layers; the chosen pages' keys after it (layer mean)."""
        n = self.context_len
        if n is None or p < n or self.spec is None:
            return p + 1
        nl = self.spec.n_layers
        dense = sum(self._dense_layer(i) for i in range(nl))
        pages = min(max(3, self.budget // self.page), -(-(p + 1) // self.page))
        return (dense * (p + 1) + (nl - dense) * min(p + 1, pages * self.page)) // nl

    def memory_model(self, length: int, chunk: int, device: str) -> dict[str, int]:
        """Every token's K/V; per page a min and a max key per KV head (one token's K/V worth); the dense prefill
        scores a query tile against the whole context."""
        return {"device_tokens": length + -(-length // self.params["chunk_size"]), "host_tokens": 0,
                "workspace_keys": length}
