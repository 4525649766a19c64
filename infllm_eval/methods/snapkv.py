"""SnapKV as kvpress implements it (`SnapKVPress`; SnapKV: Li et al., 2024, "SnapKV: LLM Knows What You are Looking
for Before Generation", arXiv 2404.14469). Source: NVIDIA/kvpress @ 8bb29b9, `kvpress/presses/snapkv_press.py`
(`SnapKVPress.score`, `compute_window_attention`), on `scorer_press.py: ScorerPress.compress` (the shared steps:
`scorer_press.py` here). Spec: shared/reference/methods-wave2.md section 5.

The context (prompt[:-1], n tokens) is prefilled with full attention; the last `window_size` (W) rotated queries are
kept across the chunked calls. At the compression point, per layer:
1. those W queries attend to all n keys (rotated at true positions, scale 1/sqrt(d), causal inside the window), one
   softmax per query over the keys it sees; the columns of the first n - W keys are kept;
2. averaged over the W queries, then a 1-D average pool over key positions (`kernel_size` k, padding k // 2,
   stride 1, zero padding counted: torch's `avg_pool1d` default, so the first and last k // 2 keys are diluted);
3. averaged over the G query heads of each KV head (kvpress's group mean), so the index set is per KV head;
4. the window keys score above every other key (kvpress pads them with max + 1), and each KV head keeps its top
   keys (see scorer_press.py: ratio or kept_tokens, ties to the lower position).
Later tokens attend to their KV head's kept keys and to every later token, at true positions.

Harness decisions [inferred]:
- Compression point: kvpress compresses the context before the question; the harness's prompt is one piece, so the
  press compresses prompt[:-1] when `end_context` fires (after the context prefill, before the last prompt token's
  call): the observation window is the prompt's last W tokens before its last one, question included (as in the
  SnapKV paper, not kvpress's question-agnostic setting). Results must state it.
- The window is always kept: a head keeps max(n_keep, W) keys (kvpress's top-k among the W tied window scores is
  unspecified when n(1 - r) < W), and a context of n <= W tokens is not compressed (kvpress asserts n > W).
- `kernel_size` must be odd: with an even one kvpress's pooled scores are one longer than the keys and its reshape
  fails.
No bug of the original changes outputs here: kvpress's max + 1 is taken over all heads and batch rows (any value
above the head's scores keeps the window) and its softmax is fp32, as here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from infllm_eval.errors import UserError
from infllm_eval.methods import METHODS
from infllm_eval.methods.scorer_press import ScorerPress


@METHODS.register("snapkv")
class SnapKV(ScorerPress):
    name = "snapkv"
    param_names = ("compression_ratio", "kept_tokens", "window_size", "kernel_size", "base", "distance_scale")

    def validate(self) -> None:
        super().validate()
        w, ks = self.params["window_size"], self.params["kernel_size"]
        for key, x in (("window_size", w), ("kernel_size", ks)):
            if isinstance(x, bool) or not isinstance(x, int) or x <= 0:
                raise UserError(f"method.params.{key} must be a positive integer, got {x!r}.")
        if ks % 2 == 0:
            raise UserError(f"method.params.kernel_size must be odd (the pooled scores keep one per key), got {ks}.")
        k = self.params["kept_tokens"]
        if k is not None and k < w:
            raise UserError(f"method.params.kept_tokens ({k}) must be at least window_size ({w}): the observation "
                            f"window is always kept.")

    def n_keep(self, n: int) -> int:
        return max(super().n_keep(n), min(self.params["window_size"], n))

    def observe(self, state, q, probs):
        """Keep the last W rotated queries [H, <= W, D]."""
        w = self.params["window_size"]
        last = q[0, :, -w:] if state["obs"] is None else torch.cat([state["obs"], q[0, :, -w:]], dim=1)[:, -w:]
        state["obs"] = last.clone(memory_format=torch.contiguous_format)

    def score(self, state, n):
        w, ks = self.params["window_size"], self.params["kernel_size"]
        keys = state["kv"].view()[0][0].float()  # [H_kv, n, D] rotated
        qw = state["obs"].float()  # [H, W, D] rotated, positions n - W .. n - 1
        Hkv, H, D = keys.shape[0], qw.shape[0], qw.shape[2]
        G = H // Hkv
        lg = torch.matmul(qw.reshape(Hkv, G * w, D), keys.transpose(1, 2)).view(Hkv, G, w, n) * self.scale
        future = torch.arange(n, device=lg.device)[None, :] > torch.arange(n - w, n, device=lg.device)[:, None]
        probs = lg.masked_fill_(future, -float("inf")).softmax(dim=-1)[..., : n - w]  # [H_kv, G, W, n - W]
        s = F.avg_pool1d(probs.mean(dim=2), kernel_size=ks, padding=ks // 2, stride=1)  # [H_kv, G, n - W]
        s = s.mean(dim=1)  # the KV group's mean [H_kv, n - W]
        return torch.cat([s, s.new_full((Hkv, w), float(s.max()) + 1)], dim=1)
