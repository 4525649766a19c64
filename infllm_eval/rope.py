"""Rotary position embedding that reuses the model's own rotary module.

Methods own their position scheme (InfLLM puts distant tokens at one fixed distance, StreamingLLM uses in-cache
positions), so they rotate q/k themselves. `Rope` wraps the model's `rotary_emb` so every rope type the model
supports (default, llama3, linear, ...) keeps working, and adds the reference's two knobs:
`base` (rope theta; NTK-style extension) and `distance_scale` (positions are multiplied by it; PI).

`rotate_range` serves contiguous positions from a cos/sin table built once per device (the windowed methods
rotate by window-relative positions, the same few thousand every execution block); rope types whose angles
depend on the call (`dynamic`, `longrope`) are computed per call instead.
"""

from __future__ import annotations

import copy

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rope:
    """`layer_type`: for models whose RoPE differs per layer type (Gemma 3: `sliding_attention` layers use the local
    base, `full_attention` ones the global base and its scaling), the type of the layers this Rope rotates for; the
    model's rotary module then takes it on every call. None for models with one RoPE."""

    def __init__(self, model, base: float | None = None, distance_scale: float | None = None,
                 layer_type: str | None = None):
        rotary = model.model.rotary_emb
        if base is not None:
            cfg = copy.deepcopy(rotary.config)
            params = copy.deepcopy(dict(getattr(cfg, "rope_parameters", None) or {}))
            (params[layer_type] if layer_type is not None else params)["rope_theta"] = float(base)
            cfg.rope_parameters = params
            device = next(iter(rotary.buffers())).device
            rotary = type(rotary)(config=cfg).to(device)
        self.rotary = rotary
        self.layer_type = layer_type
        self.distance_scale = 1.0 if distance_scale is None else float(distance_scale)
        self.base = base
        rope_type = getattr(rotary, "rope_type", "default")
        if isinstance(rope_type, dict):
            rope_type = rope_type.get(layer_type, "default")
        self.static = rope_type not in ("dynamic", "longrope")
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for 1-D `positions` [S] -> two tensors [S, D] in fp32 (rotation is done in fp32)."""
        pos = positions.to(torch.float32) * self.distance_scale if self.distance_scale != 1.0 else positions
        probe = like.new_empty(0, dtype=torch.float32)
        if self.layer_type is None:
            cos, sin = self.rotary(probe, pos[None].to(like.device))
        else:
            cos, sin = self.rotary(probe, pos[None].to(like.device), self.layer_type)
        return cos[0], sin[0]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [B, H, S, D] by per-position cos/sin [S, D] (or [1, D] for one angle); fp32 math."""
        xf = x.float()
        return (xf * cos + rotate_half(xf) * sin).to(x.dtype)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self.cos_sin(positions, x)
        return self.apply(x, cos, sin)

    TABLE_MAX = 1 << 16  # positions served from the table; beyond it (full attention at long lengths) per call

    def rotate_range(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotate x [B, H, S, D] at positions start .. start + S - 1 (the same values as `rotate`)."""
        end = start + x.shape[2]
        if not self.static or end > self.TABLE_MAX:
            return self.rotate(x, torch.arange(start, end, device=x.device))
        cos, sin = self._tables.get(x.device, (None, None))
        if cos is None or cos.shape[0] < end:
            n = min(self.TABLE_MAX, max(1024, 1 << (end - 1).bit_length()))
            cos, sin = self.cos_sin(torch.arange(n, device=x.device), x)
            self._tables[x.device] = cos, sin
        return self.apply(x, cos[start:end], sin[start:end])
