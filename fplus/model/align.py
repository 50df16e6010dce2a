"""FLARE-style future-latent alignment (E4): FUT hidden states at a backbone layer -> MLP -> cosine to z_future.

With M learnable <FUT_j> tokens placed before the ACT tokens, the backbone itself learns to anticipate:
    fut_h (B, M, d) at layer L -> MLP -> (B, M, D);  L_align = 1 - cos(., z_future[:, :M]) over valid steps.
"""

from __future__ import annotations

import torch
from torch import nn

from fplus.model.prophet import world_loss


class FutureAlignment(nn.Module):
    """Args: hidden_size: d. latent_dim: D. layer: L, the backbone layer whose hidden states are aligned."""

    def __init__(self, hidden_size: int, latent_dim: int, layer: int):
        super().__init__()
        self.layer = layer
        self.mlp = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, 2 * hidden_size), nn.GELU(),
                                 nn.Linear(2 * hidden_size, latent_dim))

    def forward(self, fut_h: torch.Tensor) -> torch.Tensor:
        """(B, M, d) -> (B, M, D)."""
        return self.mlp(fut_h)

    def loss(self, fut_h: torch.Tensor, z_future: torch.Tensor, valid: torch.Tensor):
        """(loss, mean cosine) of the projected FUT states against z_future (B, >=M, D), valid (B, >=M)."""
        m = fut_h.shape[1]
        return world_loss(self(fut_h), z_future[:, :m], valid[:, :m])
