"""InfLLM: training-free context memory (Xiao et al., arXiv 2402.04617), as the reference code's HEAD does it.

Each layer keeps a local window of the last `n_local` tokens at true RoPE distances, the first `n_init` tokens, and
memory units of `block_size` evicted tokens. For every execution block of `exc_block_size` queries (every token in
decoding) the layer scores all units with the block's mean global query against each unit's representative vector
(mean of the `repr_topk` keys that received the most local attention, per query head; scores summed over heads)
and attends to the `topk` best units, the initial tokens and the evicted-but-not-yet-packed remainder, all placed
at one fixed distance (`global_distance`, the code's n_local - 1), in ONE softmax with the local window.

Departures / named options (recorded in provenance via `describe()`):
- `prefill_mask_fix` (default true): the reference's prefill complement mask uses the wrong offset so, inside an
  execution block, up to E-1-i of a query's oldest local tokens are attended twice (locally and globally; §2.12.1).
  `false` reproduces that duplicate attention; decoding is identical either way. The released code has the bug,
  so the paper presets (`preset=mistral-infbench`, ...) and `preset=infllm-original` set `false` and name their
  results `infllm-original`; `method=infllm` stays the corrected masking, named `infllm` (`check_name` refuses a
  `method.name` that says the other masking, so a report never mixes the two in one row).
- Ties (a rule here, not the reference's): equal lookup scores rank the lower unit index first, in every lookup
  path (shared, `perhead`, `chunk_topk_calc`, `neighbor_units`, `faiss`), and equal accumulated scores the lower
  token index first when picking representative tokens (`rank` / `top`: a stable descending sort). The
  reference's `torch.topk` orders ties as its kernel happens to, which differs across devices and implementations.
- `global_distance` (default null = n_local - 1, as the code; the paper's text says n_local).
- `offload` (auto = on for CUDA): units in host memory, `max_cached_block` device slots with `lru` / `lru-s`.
- `pin_memory`, `async_global_stream`, `faiss`, `fattn` (reference options; speed and device memory only, never
  outputs): pinned host copies of the units; unit copies on a second CUDA stream (`memory.SideStream`; default off
  here, on in the reference's function signature); the representative vectors kept and scored in host memory (the
  reference's CPU faiss index is an exact inner-product search, as is the matmul here); fused kernels or not.
- `perhead` (reference option): one selection per query head instead of one per layer.
- `chunk_topk_calc` (reference option): top-k for several execution blocks at once with the units existing then.
- `head_reduce` (default `sum` = the reference; `max` is beyond the paper): a unit's lookup score is the sum of
  its per-head scores, or their maximum (a unit that one head finds is retrieved).
- `neighbor_units` (default 0 = the reference; beyond the paper): the `neighbor_units` best-ranked units also bring
  the unit before and after them, the rest of the `topk` slots are filled by rank; with `neighbor_extra` (default
  false) the neighbours come on top of the `topk` best (up to topk + 2 * neighbor_units units). Measured on
  SmolLM2 passkey: the misses were needles whose key straddled a unit boundary (README, *Measured results*).

Observation hook (for the research probes in `probes/`; never changes outputs): `observer` is None (class default,
one `if` per lookup / packed unit when unset); set it on an instance to a callable `observer(event, layer, **data)`:
- `"lookup"`, each time the units are scored (more than topk stored): `query` the mean global queries [nb, H, D]
  (fp32), `scores` the per-head unit scores [nb, H, U], `selection` the chosen units per block (as returned by
  `_plan_topk`), `first` / `n_queries` the block's first query and the call's query count (1 when decoding);
- `"unit"`, each unit packed into memory: `keys` [B, H_kv, block_size, D] (un-rotated) and `scores` [B, H,
  block_size] (accumulated local attention), from which the representative vector is built.
The tensors are views valid only during the call (copy what you keep); setting `observer = None` detaches it.
"""

from __future__ import annotations

from typing import Any

import torch

from infllm_eval.errors import UserError
from infllm_eval.methods import METHODS
from infllm_eval.methods.base import ContextMethod
from infllm_eval.methods.kernels import INF, Stage, multi_stage_attention
from infllm_eval.methods.memory import SideStream, SlidingKV, UnitStore


#: method.params.unit_dtype: the dtype memory units are stored in (null: the run's compute dtype)
UNIT_DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def rank(score: torch.Tensor) -> torch.Tensor:
    """Indices along the last dimension, best score first; equal scores by lower index first. `torch.topk` (the
    reference's choice) orders equal scores as its kernel happens to, which differs across devices and
    implementations; a stable descending sort makes the order a rule, so two implementations agree on ties."""
    return torch.sort(score, dim=-1, descending=True, stable=True).indices


def top(score: torch.Tensor, k: int) -> torch.Tensor:
    """The `k` best indices along the last dimension in `rank` order (ties: lower index first)."""
    return rank(score)[..., :k]


def _positive(params: dict, *keys: str) -> None:
    for key in keys:
        v = params[key]
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise UserError(f"method.params.{key} must be a positive integer, got {v!r}.")


@METHODS.register("infllm")
class InfLLM(ContextMethod):
    name = "infllm"
    position_scheme = "local: true distance; init + units + remainder: fixed distance"
    param_names = ("n_init", "n_local", "topk", "block_size", "repr_topk", "exc_block_size", "max_cached_block",
                   "cache_strategy", "score_decay", "chunk_topk_calc", "perhead", "base", "distance_scale",
                   "global_distance", "prefill_mask_fix", "offload", "neighbor_units", "neighbor_extra", "head_reduce",
                   "pin_memory", "async_global_stream", "faiss", "unit_dtype")
    neutral = {"head_reduce": "sum", "neighbor_extra": False, "pin_memory": True, "async_global_stream": False,
               "faiss": False, "unit_dtype": None}
    stores_units = True  # offload_dir applies: the units go to files there
    observer = None  # see "Observation hook" above

    def validate(self) -> None:
        super().validate()
        p = self.params
        _positive(p, "n_local", "topk", "block_size", "repr_topk", "exc_block_size", "max_cached_block")
        if not isinstance(p["n_init"], int) or p["n_init"] < 0:
            raise UserError(f"method.params.n_init must be a non-negative integer, got {p['n_init']!r}.")
        if p["n_local"] < p["exc_block_size"]:
            raise UserError(f"method.params.n_local ({p['n_local']}) must be >= exc_block_size "
                            f"({p['exc_block_size']}), as in the reference.")
        if p["repr_topk"] > p["block_size"]:
            raise UserError(f"method.params.repr_topk ({p['repr_topk']}) must be <= block_size ({p['block_size']}).")
        if p["max_cached_block"] < p["topk"]:
            raise UserError(f"method.params.max_cached_block ({p['max_cached_block']}) must be >= topk "
                            f"({p['topk']}); the reference crashes in that case (set max_cached_block >= topk).")
        if p["cache_strategy"] not in ("lru", "lru-s"):
            raise UserError(f"method.params.cache_strategy must be 'lru' or 'lru-s', got {p['cache_strategy']!r}.")
        if p["cache_strategy"] == "lru-s" and not isinstance(p["score_decay"], (int, float)):
            raise UserError("method.params.score_decay must be a number when cache_strategy is 'lru-s' (e.g. 0.1).")
        ctc = p["chunk_topk_calc"]
        if ctc is not None and (not isinstance(ctc, int) or ctc < p["exc_block_size"]):
            raise UserError(f"method.params.chunk_topk_calc must be null or an integer >= exc_block_size, got {ctc!r}.")
        nb = p["neighbor_units"]
        extra = bool(p["neighbor_extra"])
        if not isinstance(nb, int) or isinstance(nb, bool) or nb < 0 or (not extra and 3 * nb > p["topk"]):
            raise UserError(f"method.params.neighbor_units must be an integer with 0 <= 3 * neighbor_units <= topk "
                            f"({p['topk']}), got {nb!r} (or set neighbor_extra=true).")
        if extra and p["max_cached_block"] < p["topk"] + 2 * nb:
            raise UserError(f"method.params.max_cached_block ({p['max_cached_block']}) must be >= topk + 2 * "
                            f"neighbor_units ({p['topk'] + 2 * nb}) with neighbor_extra=true.")
        if nb and p["perhead"]:
            raise UserError("method.params.neighbor_units works with the shared selection only; set perhead=false.")
        if p["head_reduce"] not in ("sum", "max"):
            raise UserError(f"method.params.head_reduce must be 'sum' (the reference) or 'max', "
                            f"got {p['head_reduce']!r}.")
        for key in ("pin_memory", "async_global_stream", "faiss"):
            if not isinstance(p[key], bool):
                raise UserError(f"method.params.{key} must be true or false, got {p[key]!r}.")
        if p["unit_dtype"] not in UNIT_DTYPES:
            raise UserError(f"method.params.unit_dtype must be null (the compute dtype) or one of "
                            f"{', '.join(k for k in UNIT_DTYPES if k)}, got {p['unit_dtype']!r}.")
        if p["offload"] not in ("auto", True, False):
            raise UserError(f"method.params.offload must be auto, true or false, got {p['offload']!r}.")

    #: the result name of the reference code's prefill masking (`prefill_mask_fix: false`; the paper presets and
    #: preset=infllm-original set it); `infllm` is the corrected masking. A report holding both shows two rows
    ORIGINAL_NAME = "infllm-original"

    def check_name(self, name: str) -> None:
        fix = bool(self.params["prefill_mask_fix"])
        if name == self.name and not fix:
            raise UserError(f"method.name '{name}' names the corrected masking, but prefill_mask_fix is false (the "
                            f"reference code's): name these results apart, e.g. method.name={self.ORIGINAL_NAME} "
                            f"(preset=infllm-original and the paper presets do), so reports never mix the two.")
        if name == self.ORIGINAL_NAME and fix:
            raise UserError(f"method.name '{name}' names the reference code's masking, but prefill_mask_fix is true "
                            f"(the corrected one): with a paper preset and the corrected masking set "
                            f"method.name={self.name} (or another name).")

    def offloads(self, device: str) -> bool:
        """Whether memory units live in host memory on a device of this type (`offload: auto` = on for CUDA)."""
        offload = self.params["offload"]
        return device == "cuda" if offload == "auto" else bool(offload)

    def bind(self, model, spec) -> None:
        super().bind(model, spec)
        p = self.params
        self.n_local, self.n_init, self.topk = p["n_local"], p["n_init"], p["topk"]
        self.block_size, self.repr_topk, self.exc = p["block_size"], p["repr_topk"], p["exc_block_size"]
        self.dist = p["n_local"] - 1 if p["global_distance"] is None else int(p["global_distance"])
        self.mask_fix = bool(p["prefill_mask_fix"])
        self.perhead = bool(p["perhead"])
        self.offload = self.offloads(spec.device.type)
        self.group = spec.n_heads // spec.n_kv_heads
        async_copies = self.offload and spec.device.type == "cuda" and bool(p["async_global_stream"])
        self.side = SideStream(spec.device) if async_copies else None  # one per run, shared by the layers
        self.unit_dtype = UNIT_DTYPES[p["unit_dtype"]]
        self.check_offload_dir(spec.offload_dir, spec.device.type)

    def check_offload_dir(self, offload_dir: str | None, device: str) -> None:
        super().check_offload_dir(offload_dir, device)
        if offload_dir is not None and device == "cuda" and not self.offloads(device):
            raise UserError("offload_dir holds memory units that live in host memory, but on CUDA with "
                            "method.params.offload=false they stay on the GPU; set offload to auto or true, or "
                            "unset offload_dir.")

    def describe(self) -> dict:
        return {**super().describe(), "prefill_mask_fix": bool(self.params["prefill_mask_fix"]),
                "neighbor_units": int(self.params["neighbor_units"])}

    def new_state(self, layer_idx: int) -> dict:
        return {"layer": layer_idx, "rem": None, "units": None, "init_len": 0, "init_k": None, "init_v": None}

    def snapshot_states(self, states: list) -> list:
        """Prefix reuse: each layer's window / remainder copied (it changes in place), its units as a count
        (written once, never changed: `UnitStore.rewind`), its initial tokens by reference (replaced, never
        changed in place)."""
        snaps = []
        for state in states:
            snap = dict(state)
            if state["rem"] is not None:
                cap = state["rem"].k.shape[2]  # the kept tokens only, in the snapshot; its capacity back on restore
                snap["rem"], snap["units"] = (state["rem"].copy("kept"), cap), (state["units"], state["units"].n)
            snaps.append(snap)
        return snaps

    def restore_states(self, snap: list) -> list:
        states = []
        for s in snap:
            state = dict(s)
            if s["rem"] is not None:
                units, n = s["units"]
                units.rewind(n)
                rem, cap = s["rem"]
                state["rem"], state["units"] = rem.copy(cap), units
                state["rem"].before_overwrite = units.settle_writes
            states.append(state)
        return states

    # -- one forward call ---------------------------------------------------------------------------------------
    def attend(self, state: dict, q, k, v, pos, out=None):
        L = q.shape[2]
        p_first = int(pos[0])
        if state["rem"] is None:
            # the remainder never holds more than n_local + block_size + exc_block_size tokens (K/V is appended per
            # execution block), so its buffer does not depend on chunk_size; x2 makes compaction rare
            state["rem"] = SlidingKV(k, self.spec.n_heads, capacity=2 * (self.n_local + self.block_size + self.exc))
            p = self.params
            state["units"] = UnitStore(k, self.spec.n_heads, self.block_size, self.offload, p["max_cached_block"],
                                       p["cache_strategy"], p["score_decay"], pin_memory=p["pin_memory"],
                                       side=self.side, repr_on_host=bool(p["faiss"]), unit_dtype=self.unit_dtype,
                                       scratch=self.spec.offload_dir)
            state["rem"].before_overwrite = state["units"].settle_writes
        rem: SlidingKV = state["rem"]
        units: UnitStore = state["units"]
        out = q.new_empty(q.shape) if out is None else out
        plan = None
        for st in range(0, L, self.exc):
            ed = min(L, st + self.exc)
            if plan is None or not plan:
                plan = self._plan_topk(state, q, st, L)
            sel = plan.pop(0)
            if sel is not None and not self.perhead:
                units.load(sel)  # with offload, the copies start before the block's local-stage work is queued
            rem.append(k[:, :, st:ed], v[:, :, st:ed])
            self._exec_block(state, q[:, :, st:ed], self._global_q(q[:, :, st:ed]), pos[st:ed],
                             p_first + st, p_first + ed, sel, out[:, :, st:ed])
            self._append_global(state, p_first + ed)
        return out

    def _global_q(self, q: torch.Tensor) -> torch.Tensor:
        """Queries as they meet distant keys: every global query sits at `dist` (global keys are un-rotated, at
        position 0). Rotated per execution block, so no chunk-sized temporaries."""
        return self.rope.rotate(q, torch.tensor([self.dist], device=q.device))

    def _plan_topk(self, state, q, st: int, L: int) -> list:
        """Unit selections for the next execution block(s): one, or `chunk_topk_calc // exc_block_size` at once."""
        ctc = self.params["chunk_topk_calc"]
        n_blocks = 1 if ctc is None else max(1, ctc // self.exc)
        blocks = [(s, min(L, s + self.exc)) for s in range(st, min(L, st + n_blocks * self.exc), self.exc)]
        units: UnitStore = state["units"]
        if units.n == 0:
            return [None for _ in blocks]
        if units.n <= self.topk:  # reference: with no more units than topk, every unit is used
            every = list(range(units.n))
            return [torch.arange(units.n).expand(self.spec.n_heads, -1) if self.perhead else every for _ in blocks]
        qm = torch.stack([self._global_q(q[:, :, s:e]).float().mean(dim=2) for s, e in blocks], dim=1)  # [B, nb, H, D]
        per_head = self.unit_scores(qm, units)  # [nb, H, U]
        if self.perhead:
            idx = top(per_head, self.topk).sort(dim=-1).values  # [nb, H, topk]
            plan = [idx[i] for i in range(len(blocks))]
        else:
            score = per_head.amax(dim=1) if self.params["head_reduce"] == "max" else per_head.sum(dim=1)  # [nb, U]
            nbr = self.params["neighbor_units"]
            if nbr:
                order = rank(score).tolist()  # [nb, U] best first
                plan = [self._with_neighbors(o, units.n, nbr) for o in order]
            else:
                plan = top(score, self.topk).sort(dim=-1).values.tolist()  # [nb, topk]
        if self.observer is not None:
            self.observer("lookup", state["layer"], query=qm[0], scores=per_head, selection=list(plan), first=st,
                          n_queries=L)
        return plan

    @staticmethod
    def unit_scores(qm: torch.Tensor, units: UnitStore) -> torch.Tensor:
        """Lookup scores per query head: mean global queries qm [B, nb, H, D] . representative vectors -> [nb, H, U]
        (no 1/sqrt(d), no softmax; the shared selection sums them over heads)."""
        reprs = units.reprs
        return torch.einsum("bnhd,ubhd->bnhu", qm.to(reprs.device), reprs.float())[0]

    def _with_neighbors(self, order: list[int], n_units: int, n_centers: int) -> list[int]:
        """The `n_centers` best units with the units either side of them, then the next best by rank; topk in all
        (or, with `neighbor_extra`, the topk best plus the centres' neighbours: at most topk + 2 * n_centers)."""
        chosen: dict[int, None] = {}
        if self.params["neighbor_extra"]:
            for u in order[: self.topk]:
                chosen.setdefault(u)
        for u in order[:n_centers]:
            for w in (u - 1, u, u + 1):
                if 0 <= w < n_units:
                    chosen.setdefault(w)
        for u in order:
            if len(chosen) >= self.topk:
                break
            chosen.setdefault(u)
        return sorted(chosen)  # the centres and their neighbours take <= 3 * n_centers <= topk slots (not extra)

    def _exec_block(self, state, q_blk, qg_blk, pos_blk, p0: int, p1: int, sel, out: torch.Tensor) -> None:
        """Attention for queries at positions [p0, p1), written into `out`: local window + (units, init,
        remainder) at fixed distance."""
        rem: SlidingKV = state["rem"]
        units: UnitStore = state["units"]
        # local stage: window-relative positions keep RoPE angles small at any context length
        w0 = max(p0 - self.n_local + 1, rem.start)
        k_loc, v_loc = rem.kv(w0, p1)
        q_loc = self.rope.rotate_range(q_blk, p0 - w0)
        k_loc = self.rope.rotate_range(k_loc, 0)
        h = self._per_head_layout
        stages = [Stage(q_loc, h(k_loc), h(v_loc), k_start=w0, band=(0, self.n_local - 1), want_scores=True)]
        # global stage 1: retrieved units + initial tokens (always visible)
        init = (h(state["init_k"]), h(state["init_v"])) if state["init_len"] > 0 else None
        if sel is None:
            gk, gv = init if init is not None else (None, None)
        else:  # units then initial tokens
            gk, gv = self._gather_perhead(units, sel, init) if self.perhead else units.gather(sel, tail=init)
        if gk is not None:
            want = units.offload and self.params["cache_strategy"] == "lru-s" and not self.perhead
            stages.append(Stage(qg_blk, gk, gv, want_scores=want))
        # global stage 2: remainder tokens beyond the window of the block's last query; with the fix, a query
        # sees only those beyond its own window (distance >= n_local), without it all of them (reference bug)
        r1 = p1 - self.n_local
        if r1 > rem.start:
            rk, rv = rem.kv(rem.start, r1)
            band = (self.n_local, INF) if self.mask_fix else None
            stages.append(Stage(qg_blk, h(rk), h(rv), k_start=rem.start,
                                band=band))
        _, scores = multi_stage_attention(stages, pos_blk, self.scale, self.q_tile, self.fattn, out=out)
        loc = scores[0]  # [B, H, window] summed over the block's queries
        rem.scores(w0, p1).add_(loc)
        if len(scores) > 1 and scores[1] is not None and sel is not None:
            n_u = len(sel) * self.block_size
            mass = scores[1][..., :n_u].sum(dim=(0, 1)).view(len(sel), self.block_size).sum(-1)
            units.credit(sel, mass)

    def _per_head_layout(self, x: torch.Tensor) -> torch.Tensor:
        """perhead: every stage uses one K/V head per query head (units differ per head); else unchanged (GQA)."""
        return x.repeat_interleave(self.group, dim=1) if self.perhead and self.group > 1 else x

    def _gather_perhead(self, units: UnitStore, sel: torch.Tensor, tail=None):
        """perhead: head h attends to its own units: K/V [B, H, topk*bs (+ T), D] (KV heads expanded per query
        head), then `tail` (K, V [B, H, T, D]) if given."""
        ks, vs = [], []
        for h in range(self.spec.n_heads):  # research option (reference: "very time-consuming")
            k, v = units.gather(sel[h].tolist())
            kvh = h // self.group
            ks.append(k[:, kvh : kvh + 1]), vs.append(v[:, kvh : kvh + 1])
        k, v = torch.cat(ks, dim=1), torch.cat(vs, dim=1)
        return (k, v) if tail is None else (torch.cat([k, tail[0]], dim=2), torch.cat([v, tail[1]], dim=2))

    def _append_global(self, state: dict, rem_end: int) -> None:
        """After an execution block ending at `rem_end`: fill the initial tokens, then pack full units."""
        rem: SlidingKV = state["rem"]
        units: UnitStore = state["units"]
        rem_len = rem_end - rem.start
        if state["init_len"] < self.n_init and rem_len > self.n_local:
            n = min(self.n_init - state["init_len"], rem_len - self.n_local)
            k, v = rem.kv(rem.start, rem.start + n)
            state["init_k"] = k.clone() if state["init_k"] is None else torch.cat([state["init_k"], k], dim=2)
            state["init_v"] = v.clone() if state["init_v"] is None else torch.cat([state["init_v"], v], dim=2)
            state["init_len"] += n
            rem.drop_before(rem.start + n)
            rem_len -= n
        while rem_len - self.block_size >= self.n_local:
            s = rem.start
            k, v = rem.kv(s, s + self.block_size)
            score = rem.scores(s, s + self.block_size)
            if self.observer is not None:
                self.observer("unit", state["layer"], keys=k, scores=score)
            units.add(k, v, self._representative(k, score))
            rem.drop_before(s + self.block_size)
            rem_len -= self.block_size

    def _representative(self, k: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """Per query head: mean of the un-rotated keys of the `repr_topk` tokens with the highest accumulated local
        attention. k [B, H_kv, bs, D], score [B, H, bs] -> [B, H, D]."""
        idx = top(score, self.repr_topk)  # [B, H, r]
        k_h = k.repeat_interleave(self.group, dim=1)  # [B, H, bs, D] (one KV head per query-head group)
        picked = torch.gather(k_h, 2, idx[..., None].expand(-1, -1, -1, k.shape[-1]))
        return picked.float().mean(dim=2).to(k.dtype)

    def attended_keys(self, p: int) -> int:
        """Local window + initial tokens + retrieved units + not-yet-packed remainder (approximate: the remainder
        is counted as its average, half a unit plus half an execution block)."""
        beyond = max(0, p + 1 - self.n_local)
        init = min(self.n_init, beyond)
        n_units = max(0, beyond - init - self.exc) // self.block_size
        rest = min(beyond - init, (self.block_size + self.exc) // 2)
        return min(p + 1, self.n_local) + init + min(n_units, self.topk) * self.block_size + rest

    def memory_model(self, length: int, chunk: int, device: str) -> dict[str, int]:
        """On the device: the remainder buffer (local window + not-yet-packed tokens, its capacity in `attend`), the
        initial tokens and the cached units (max(topk, max_cached_block) of them when offloading, else every unit);
        with offloading, every unit (length - n_local - n_init tokens) in host memory (`unit_tokens`, stored in
        `unit_dtype`; with an offload_dir `plan` counts them on disk), and one representative vector per unit
        (`repr_vectors`, n_heads x head_dim in the compute dtype). A query tile is
        scored against the window, the initial tokens, topk units and one execution block of remainder."""
        p = self.params
        window = 2 * (p["n_local"] + p["block_size"] + p["exc_block_size"]) + p["n_init"]
        units = max(0, length - p["n_local"] - p["n_init"])
        offload = self.offloads(device)
        cached = min(units, max(p["topk"], p["max_cached_block"]) * p["block_size"]) if offload else units
        keys = p["n_local"] + p["n_init"] + p["topk"] * p["block_size"] + p["exc_block_size"]
        return {"device_tokens": window + cached, "host_tokens": units if offload else 0,
                "workspace_keys": min(keys, length),
                # the units (inside the host or device tokens), stored in unit_dtype; one representative vector each
                "unit_tokens": units, "units_on": "host" if offload else "device", "unit_dtype": p["unit_dtype"],
                "repr_vectors": units // p["block_size"], "repr_on": "host" if p["faiss"] else "device"}

    def kv_bytes(self, states: list) -> dict[str, int]:
        """Stored tokens' K/V: units offloaded to the host count as offloaded; everything else (window and
        remainder, initial tokens, representative vectors, occupied device cache slots) as on the device."""
        device = super().kv_bytes(states)["device"]  # UnitStore.nbytes() counts only its device part
        off = sum(u.nbytes_host() for u in (s["units"] for s in states)
                  if u is not None and (u.offload or u.scratch is not None))
        return {"device": device, "offloaded": off}

    def memory_stats(self, states: list) -> dict[str, Any]:
        """Units stored (over layers), their bytes in the storage dtype, where they were kept (`memory`, or `files`
        under offload_dir), and with offload the device cache's hits and misses."""
        units = [s["units"] for s in states if s["units"] is not None]
        stats = {"units": sum(u.n for u in units), "unit_bytes": sum(u.nbytes_host() for u in units),
                 "unit_dtype": str(self.unit_dtype or self.spec.dtype).removeprefix("torch."),
                 "unit_storage": "files" if self.spec.offload_dir is not None else "memory"}
        if self.offload:
            stats.update(cache_hits=sum(u.hits for u in units), cache_misses=sum(u.misses for u in units))
        return stats
