"""StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks"), as the InfLLM code
re-implements it (§4.1): `n_init` attention-sink tokens + a window of `n_local` tokens, chunked prefill.

Positions are in-cache: the initial tokens keep positions 0..n_init-1 and the query sits at n_local + n_init - 1,
so initial token j is at distance n_local + n_init - 1 - j, as if the cache [init | window] were contiguous.
The original repository's own setting (start_size 4, recent_size 2000; decode-oriented) is the same position
scheme with other sizes: `method=streamingllm-original`.
"""

from __future__ import annotations

import torch

from infllm_eval.methods import METHODS
from infllm_eval.methods.window import WindowMethod


@METHODS.register("streamingllm")
class StreamingLLM(WindowMethod):
    name = "streamingllm"
    position_scheme = "in-cache (init at 0..n_init-1, query at n_local+n_init-1)"

    def init_positions(self, device):
        q_at = torch.tensor([self.n_local + self.n_init - 1], device=device)
        return q_at, torch.arange(self.n_init, device=device)
