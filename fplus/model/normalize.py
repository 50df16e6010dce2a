"""Per-dimension normalisation of actions and states from dataset statistics (DESIGN 3), saved with the policy.

    mean_std:  x_n = (x - mean) / std                    (std floored at 1e-6: a dimension that never moves maps to 0)
    quantile:  x_n = 2 (x - q01) / (q99 - q01) - 1        (range floored at 1e-6)
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn

from fplus.errors import DataError

EPS = 1e-6


class Normalizer(nn.Module):
    """Normalises one feature of shape (..., F). Statistics live in buffers, so they travel in the state dict."""

    def __init__(self, dim: int, mode: Literal["mean_std", "quantile"] = "mean_std"):
        super().__init__()
        self.mode = mode
        self.register_buffer("shift", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    @classmethod
    def from_stats(cls, stats: dict[str, np.ndarray], mode: Literal["mean_std", "quantile"], key: str) -> Normalizer:
        """Build from a feature's stats ({"mean", "std"} or {"q01", "q99"}: arrays (F,))."""
        needed = ("mean", "std") if mode == "mean_std" else ("q01", "q99")
        missing = [n for n in needed if n not in stats]
        if missing:
            raise DataError(f"meta/stats.json has no {missing} for {key!r}, needed by {mode} normalisation")
        if mode == "mean_std":
            shift, scale = np.asarray(stats["mean"], np.float64), np.maximum(np.asarray(stats["std"]), EPS)
        else:
            lo, hi = np.asarray(stats["q01"], np.float64), np.asarray(stats["q99"], np.float64)
            shift, scale = (lo + hi) / 2, np.maximum((hi - lo) / 2, EPS)
        norm = cls(len(shift), mode)
        norm.shift.copy_(torch.as_tensor(shift, dtype=torch.float32))
        norm.scale.copy_(torch.as_tensor(scale, dtype=torch.float32))
        return norm

    @torch.no_grad()
    def set_mean_std(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Set mean_std statistics (F,) directly (std floored at EPS), e.g. those of the world latents."""
        if self.mode != "mean_std":
            raise DataError("set_mean_std needs a mean_std normaliser")
        self.shift.copy_(mean.float())
        self.scale.copy_(std.float().clamp(min=EPS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., F) raw -> (..., F) normalised."""
        return (x - self.shift) / self.scale

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """(..., F) normalised -> (..., F) raw."""
        return x * self.scale + self.shift
