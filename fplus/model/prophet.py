"""Prophet: predicts K future world latents from the T most recent ones and the backbone's reading (DESIGN 5).

    z_hist (B, T, D) -> project to p ----------------------------------\
    context (B, d): mean of the ACT hidden states -> LN -> project to p -> [ctx ; hist tokens ; K queries]
                                                                          -> transformer -> queries -> D
    z_pred (B, K, D)  (delta mode: z_pred = z_t + output, z_t = z_hist[:, -1])

The context token is what makes the auxiliary world loss shape the policy: L_world's gradient flows through it
into the ACT hidden states and from there into every trainable backbone weight (E1 would otherwise be E0 with a
detached side model). Latents are in the standardised space (fplus.model.policy). Every history latent is of a
frame <= t, and the ACT states see the observation at t only, so full attention inside the Prophet cannot see the
future.
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
        context_dim: d of the context vector (the backbone's hidden size), or None for a Prophet of latents only.
    """

    def __init__(self, latent_dim: int, history: int, future: int, width: int = 256, layers: int = 2,
                 heads: int = 4, delta: bool = False, context_dim: int | None = None):
        super().__init__()
        self.history, self.future, self.delta = history, future, delta
        self.inp = nn.Linear(latent_dim, width)
        self.context = nn.Sequential(nn.LayerNorm(context_dim), nn.Linear(context_dim, width)) \
            if context_dim else None
        extra = 1 if context_dim else 0
        self.queries = nn.Parameter(torch.randn(future, width) * 0.02)
        self.pos = nn.Parameter(torch.randn(extra + history + future, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, latent_dim)

    def forward(self, z_hist: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """z_hist (B, T, D), context (B, d) (required when built with context_dim) -> (B, K, D)."""
        b, t, _ = z_hist.shape
        if t != self.history:
            raise ValueError(f"Prophet expects {self.history} history latents, got {t}")
        if (context is None) != (self.context is None):
            raise ValueError("this Prophet was built " + ("with" if self.context is not None else "without")
                             + " a context input; pass context accordingly")
        parts = [self.inp(z_hist)]
        if self.context is not None:
            parts.insert(0, self.context(context.to(z_hist.dtype))[:, None])
        parts.append(self.queries.expand(b, -1, -1).to(z_hist.dtype))
        x = torch.cat(parts, dim=1) + self.pos
        y = self.out(self.norm(self.encoder(x)[:, -self.future:]))
        return z_hist[:, -1:] + y if self.delta else y


def world_cosine_sums(z_pred: torch.Tensor, z_future: torch.Tensor,
                      valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cos(z_pred, z_future) over valid steps, number of valid steps): z (B, K, D), valid (B, K).

    Accumulate both over batches and divide at the end: samples without a valid future step count for nothing
    (they do not pull the mean towards 0). A zero vector has cosine 0 with everything.
    """
    cos = F.cosine_similarity(z_pred.float(), z_future.float(), dim=-1)  # (B, K)
    w = valid.to(cos.dtype)
    return (cos * w).sum(), w.sum()


def world_loss(z_pred: torch.Tensor, z_future: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L_world = 1 - cos(z_pred, z_future), averaged over valid steps.

    Args:
        z_pred, z_future: (B, K, D). valid: (B, K) bool, False past the episode end.
    Returns:
        (loss, mean cosine) as scalars.
    """
    total, count = world_cosine_sums(z_pred, z_future, valid)
    mean_cos = total / count.clamp(min=1)
    return 1 - mean_cos, mean_cos.detach()
