"""Full attention (`origin` in the InfLLM code), plus the pure-config context extensions NTK and PI.

Every token attends to every earlier token at its true RoPE distance. `base` overrides the rope theta
(NTK-style extension, e.g. Mistral 1e6 -> 1e7 in `mistral-ntk.yaml`) and `distance_scale` multiplies positions
(position interpolation, 0.25 = x4 in `mistral-pi.yaml`); the reference pairs both with head+tail truncation
(first 128 tokens + tail), which is a task/truncation setting, not part of this module.

Departure from the reference: the reference's non-fattn `origin` path forgets the 1/sqrt(d) scaling and the GQA
repeat (its bug §2.12.5); this module always does both (the reference's configs all used the correct fattn path).
"""

from __future__ import annotations

from infllm_eval.methods import METHODS
from infllm_eval.methods.base import ContextMethod
from infllm_eval.methods.kernels import INF, Stage, multi_stage_attention


@METHODS.register("full")
class FullAttention(ContextMethod):
    name = "full"
    position_scheme = "true"
    supports_softcap = True

    def new_state(self, layer_idx: int) -> dict:
        return {"kv": None}

    def attend(self, state, q, k, v, pos, out=None):
        q, keys, values = self.append_rotated(state, q, k, v, int(pos[0]))  # positions are contiguous
        stage = Stage(q, keys, values, k_start=0, band=(0, INF))  # keys sit at positions 0..len-1
        out, _ = multi_stage_attention([stage], q_pos=pos, scale=self.scale, q_tile=self.q_tile,
                                       fused=self.fattn, out=out,
                                       softcap=self.softcap)
        return out

    def snapshot_states(self, states: list) -> list:
        """Each layer's key/value buffer and its length: it only grows (prefix reuse rewinds it)."""
        return [(st["kv"], 0 if st["kv"] is None else st["kv"].len) for st in states]

    def restore_states(self, snap: list) -> list:
        return [{"kv": None if kv is None else kv.rewind(n)} for kv, n in snap]

    def memory_model(self, length: int, chunk: int, device: str) -> dict[str, int]:
        """Every token's K/V on the device; a query tile is scored against all of them."""
        return {"device_tokens": length, "host_tokens": 0, "workspace_keys": length}
