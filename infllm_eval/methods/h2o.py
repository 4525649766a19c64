"""H2O as kvpress implements it: `ObservedAttentionPress` (related to H2O: Zhang et al., 2023, "H2O: Heavy-Hitter
Oracle for Efficient Generative Inference of Large Language Models", arXiv 2306.14048). Source: NVIDIA/kvpress @
8bb29b9, `kvpress/presses/observed_attention_press.py` (`ObservedAttentionPress.score`), on `scorer_press.py:
ScorerPress.compress` (the shared steps: `scorer_press.py` here). Spec: shared/reference/methods-wave2.md section 5.

The context (prompt[:-1], n tokens) is prefilled with full causal attention, and every context query's attention
probabilities are summed per key and query head as the chunks go by (kvpress reads the eager attention matrix
A[h, i, j] of its one-shot prefill; the column sums are the same numbers, so chunking changes nothing). At the
compression point, per layer:
1. score_j = sum_i A[h, i, j] / (n - j): the mean attention key j gets from the n - j queries that see it;
2. averaged over the G query heads of each KV head (index sets per KV head);
3. each KV head keeps its top keys (scorer_press.py: ratio or kept_tokens, ties to the lower position), with no
   recent-window protection: the last context tokens may go.
Later tokens attend to their KV head's kept keys and to every later token, at true positions.

This is kvpress's press, not the original H2O (online heavy hitters plus a recent budget during decoding).

Harness decisions [inferred]: the compression point is SnapKV's (`end_context`: prompt[:-1] compressed before the
last prompt token, question included; kvpress compresses the context before the question). The probabilities come
from the explicit fp32 attention path during the context prefill (a fused kernel returns none), so the prefill runs
slower than full's. No bug of the original changes outputs here.
"""

from __future__ import annotations

import torch

from infllm_eval.methods import METHODS
from infllm_eval.methods.scorer_press import ScorerPress


@METHODS.register("h2o")
class H2O(ScorerPress):
    name = "h2o"
    wants_scores = True

    def observe(self, state, q, probs):
        """Add the call's column sums [H, T] into state["obs"] (grown by doubling)."""
        H, T = probs.shape[1], probs.shape[2]
        acc = state["obs"]
        if acc is None or acc.shape[1] < T:
            new = probs.new_zeros(H, max(T, 1024, 0 if acc is None else 2 * acc.shape[1]))
            if acc is not None:
                new[:, : acc.shape[1]] = acc
            state["obs"] = acc = new
        acc[:, :T] += probs[0]

    def score(self, state, n):
        acc = state["obs"][:, :n]  # [H, n]
        Hkv = state["kv"].k.shape[1]
        seen_by = torch.arange(n, 0, -1, device=acc.device, dtype=acc.dtype)  # n - j queries see key j
        return (acc / seen_by).view(Hkv, -1, n).mean(dim=1)
