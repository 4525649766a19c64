"""Shared core of the two sliding-window baselines (StreamingLLM, LM-Infinite) as the InfLLM code re-implements
them (§4.1-4.2): the first `n_init` tokens plus a local window of `n_local` tokens, chunked prefill, one joint
softmax over [local window | initial tokens]. The window sees true RoPE distances; an initial token is attended
through the init stage only once it has left the query's window (distance >= n_local). Subclasses choose where
the initial tokens sit (`init_positions`). Memory is bounded: the window buffer is dropped as it slides.
"""

from __future__ import annotations

import torch

from infllm_eval.errors import UserError
from infllm_eval.methods.base import ContextMethod
from infllm_eval.methods.kernels import INF, Stage, multi_stage_attention
from infllm_eval.methods.memory import SlidingKV

WINDOW_SLACK = 64  # tokens the window buffer holds beyond n_local + 2 chunks (fewer compactions)


class WindowMethod(ContextMethod):
    param_names = ("n_init", "n_local", "base", "distance_scale")
    supports_softcap = True

    def validate(self) -> None:
        super().validate()
        for key in ("n_local", "n_init"):
            v = self.params[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if key == "n_local" else 0):
                raise UserError(f"method.params.{key} must be a {'positive' if key == 'n_local' else 'non-negative'}"
                                f" integer, got {v!r}.")

    def bind(self, model, spec) -> None:
        super().bind(model, spec)
        self.n_local, self.n_init = self.params["n_local"], self.params["n_init"]

    def init_positions(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(query position [1], key positions [n_init]) used to rotate the init stage."""
        raise NotImplementedError

    def attended_keys(self, p: int) -> int:
        return min(p + 1, self.n_local) + min(self.n_init, max(0, p + 1 - self.n_local))

    def memory_model(self, length: int, chunk: int, device: str) -> dict[str, int]:
        """The initial tokens and the window buffer (n_local + 2 chunks + slack, as `attend` allocates it); a query
        tile is scored against its window, the initial tokens and the tile itself."""
        n_init, n_local = self.params["n_init"], self.params["n_local"]
        return {"device_tokens": n_init + n_local + 2 * chunk + WINDOW_SLACK, "host_tokens": 0,
                "workspace_keys": min(n_init + n_local + self.q_tile, length)}

    def new_state(self, layer_idx: int) -> dict:
        return {"win": None, "init_k": None, "init_v": None, "init_len": 0}

    def attend(self, state, q, k, v, pos, out=None):
        L, p0 = q.shape[2], int(pos[0])
        p1 = p0 + L
        if state["win"] is None:
            state["win"] = SlidingKV(k, self.spec.n_heads, capacity=self.n_local + 2 * L + WINDOW_SLACK)
        win: SlidingKV = state["win"]
        win.append(k, v)
        if state["init_len"] < self.n_init:  # the first n_init tokens are kept for good
            n = min(self.n_init, p1) - state["init_len"]
            k0, v0 = win.kv(state["init_len"], state["init_len"] + n)
            state["init_k"] = k0.clone() if state["init_k"] is None else torch.cat([state["init_k"], k0], 2)
            state["init_v"] = v0.clone() if state["init_v"] is None else torch.cat([state["init_v"], v0], 2)
            state["init_len"] += n
        w0 = max(p0 - self.n_local + 1, 0)
        k_loc, v_loc = win.kv(w0, p1)
        stages = [Stage(self.rope.rotate_range(q, p0 - w0), self.rope.rotate_range(k_loc, 0), v_loc,
                        k_start=w0, band=(0, self.n_local - 1))]
        if state["init_len"] > 0 and p1 - 1 >= self.n_local:  # some query has init tokens beyond its window
            q_at, k_at = self.init_positions(q.device)
            ik = self.rope.rotate(state["init_k"], k_at[: state["init_len"]])
            stages.append(Stage(self.rope.rotate(q, q_at), ik, state["init_v"],
                                k_start=0, band=(self.n_local, INF)))
        out, _ = multi_stage_attention(stages, pos, self.scale, self.q_tile, self.fattn, out=out,
                                       softcap=self.softcap)
        win.drop_before(p1 - self.n_local + 1)  # the next query's window starts here at the earliest
        return out
