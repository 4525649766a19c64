"""LM-Infinite (Han et al., 2023, "Zero-Shot Extreme Length Generalization"), as the InfLLM code re-implements it
(§4.2): a Λ-shaped mask of `n_init` global tokens + a window of `n_local` tokens, chunked prefill.

Every initial token sits at one capped distance: keys un-rotated, query rotated at `global_distance`
(null = n_local - 1, as the InfLLM code; the original LM-Infinite caps at `limit_distance` = its local branch,
i.e. n_local: `method=lminfinite-original`, with global_branch 100 and local_branch 4096 as its README).
InfLLM with no retrieved units reduces to this method.
"""

from __future__ import annotations

import torch

from infllm_eval.errors import UserError
from infllm_eval.methods import METHODS
from infllm_eval.methods.window import WindowMethod


@METHODS.register("lminfinite")
class LMInfinite(WindowMethod):
    name = "lminfinite"
    position_scheme = "distance ceiling (init un-rotated, query at global_distance)"
    param_names = ("n_init", "n_local", "global_distance", "base", "distance_scale")

    def validate(self) -> None:
        super().validate()
        gd = self.params["global_distance"]
        if gd is not None and (not isinstance(gd, int) or gd < 0):
            raise UserError(f"method.params.global_distance must be null or a non-negative integer, got {gd!r}.")

    def init_positions(self, device):
        gd = self.params["global_distance"]
        q_at = torch.tensor([self.n_local - 1 if gd is None else gd], device=device)
        return q_at, torch.zeros(self.n_init, dtype=torch.long, device=device)
