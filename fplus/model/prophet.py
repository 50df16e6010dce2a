"""Prophet: predicts K future world latents from the T most recent ones (DESIGN 5).

    z_hist (B, T, D) -> project to p -> [hist tokens ; K learned queries] -> transformer -> queries -> D
    z_pred (B, K, D)  (delta mode: z_pred = z_t + output, z_t = z_hist[:, -1])

Every history latent is of a frame <= t, so full attention inside the Prophet cannot see the future.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Prophet(nn.Module):
    """Small transformer with K learned query tokens.

    Args:
        latent_dim: D. history: T. future: K. width: p, the internal width. layers, heads: transformer size.
        delta: predict z_future - z_t instead of z_future.
    """

    def __init__(self, latent_dim: int, history: int, future: int, width: int = 256, layers: int = 2,
                 heads: int = 4, delta: bool = False):
        super().__init__()
        self.history, self.future, self.delta = history, future, delta
        self.inp = nn.Linear(latent_dim, width)
        self.queries = nn.Parameter(torch.randn(future, width) * 0.02)
        self.pos = nn.Parameter(torch.randn(history + future, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, latent_dim)

    def forward(self, z_hist: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, K, D)."""
        b, t, _ = z_hist.shape
        if t != self.history:
            raise ValueError(f"Prophet expects {self.history} history latents, got {t}")
        x = torch.cat([self.inp(z_hist), self.queries.expand(b, -1, -1).to(z_hist.dtype)], dim=1) + self.pos
        y = self.out(self.norm(self.encoder(x)[:, t:]))
        return z_hist[:, -1:] + y if self.delta else y


def world_loss(z_pred: torch.Tensor, z_future: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L_world = 1 - cos(z_pred, z_future), averaged over valid steps.

    Args:
        z_pred, z_future: (B, K, D). valid: (B, K) bool, False past the episode end.
    Returns:
        (loss, mean cosine) as scalars.
    """
    cos = F.cosine_similarity(z_pred.float(), z_future.float(), dim=-1)  # (B, K)
    w = valid.to(cos.dtype)
    mean_cos = (cos * w).sum() / w.sum().clamp(min=1)
    return 1 - mean_cos, mean_cos.detach()
