"""The native sliding-window attention of a model's local layers (Gemma 2 / Gemma 3), run by the engine itself.

On a model whose layers mix global attention and a sliding window of W tokens, the context method replaces the
global layers only; the local layers keep the model's own attention, computed here exactly: every query sees the W
keys at distances 0..W-1, q and k rotated at their true positions with the local layers' RoPE, through the same
kernels as the methods (`multi_stage_attention`, one banded stage). Not a registered method: the engine builds it
with the run method's `fattn` / `q_tile` and binds it with the local layers' spec (RoPE, scale, soft-capping).
Memory is bounded: keys older than every future query's window are dropped.
"""

from __future__ import annotations

from infllm_eval.methods.base import ContextMethod
from infllm_eval.methods.kernels import Stage, multi_stage_attention
from infllm_eval.methods.memory import SlidingKV

SLACK = 64  # tokens the buffer holds beyond W + 2 calls (fewer compactions)


class SlidingWindowAttention(ContextMethod):
    name = "native-sliding-window"
    position_scheme = "true"
    supports_softcap = True

    def __init__(self, window: int, fattn: bool, q_tile: int):
        super().__init__(base=None, distance_scale=None, fattn=fattn, q_tile=q_tile)
        self.window = int(window)

    def new_state(self, layer_idx: int) -> dict:
        return {"win": None}

    def attend(self, state, q, k, v, pos, out=None):
        L, p0 = q.shape[2], int(pos[0])
        p1 = p0 + L
        if state["win"] is None:
            state["win"] = SlidingKV(k, self.spec.n_heads, capacity=self.window + 2 * L + SLACK)
        win: SlidingKV = state["win"]
        win.append(self.rope.rotate_range(k, p0), v)  # keys rotated once, at their true positions
        w0 = max(p0 - self.window + 1, win.start)
        keys, values = win.kv(w0, p1)
        stage = Stage(self.rope.rotate_range(q, p0), keys, values, k_start=w0, band=(0, self.window - 1))
        out, _ = multi_stage_attention([stage], pos, self.scale, self.q_tile, self.fattn, out=out,
                                       softcap=self.softcap)
        win.drop_before(p1 - self.window + 1)  # the next query's window starts here at the earliest
        return out

    def attended_keys(self, p: int) -> int:
        return min(p + 1, self.window)

    def memory_model(self, length: int, chunk: int, device: str) -> dict[str, int]:
        return {"device_tokens": min(length, self.window + 2 * chunk + SLACK), "host_tokens": 0,
                "workspace_keys": min(length, self.window + self.q_tile)}
