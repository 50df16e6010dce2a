"""ActionHead: an MLP on each ACT hidden state -> one action of the chunk (DESIGN 5).

`ACTION_HEAD=mse` (the default). The flow-matching alternative is fplus.model.flow_head. `prefix_blend` is what the
MSE head does with a previous chunk's prefix (real-time chunking needs a flow head; this is a plain blend).
"""

from __future__ import annotations

import torch
from torch import nn


class ActionHead(nn.Module):
    """(B, H, d) ACT hidden states -> (B, H, A) normalised actions; step h reads hidden state h.

    Args:
        hidden_size: d, the backbone's hidden size. action_dim: A. horizon: H (a learned per-step embedding is
        added so the head can tell the steps apart even where hidden states are similar).
    """

    def __init__(self, hidden_size: int, action_dim: int, horizon: int, mlp_dim: int | None = None):
        super().__init__()
        mlp_dim = mlp_dim or 2 * hidden_size
        self.step = nn.Parameter(torch.zeros(horizon, hidden_size))
        self.mlp = nn.Sequential(
            nn.LayerNorm(hidden_size), nn.Linear(hidden_size, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, action_dim)
        )

    def predict(self, act_hidden: torch.Tensor) -> torch.Tensor:
        """(B, H, d) -> (B, H, A) normalised actions."""
        return self.mlp(act_hidden + self.step.to(act_hidden.dtype))

    def loss(self, act_hidden: torch.Tensor, target: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Masked MSE between `predict(act_hidden)` and target (B, H, A), ignoring steps where pad (B, H) is True."""
        return masked_mse(self.predict(act_hidden), target, pad)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the non-padded steps: pred, target (B, H, A), pad (B, H) bool -> scalar."""
    valid = (~pad).unsqueeze(-1).to(pred.dtype)
    denom = valid.sum() * pred.shape[-1]
    return ((pred.float() - target.float()) ** 2 * valid).sum() / denom.clamp(min=1)


def prefix_blend(actions: torch.Tensor, prefix: torch.Tensor, weights: torch.Tensor, delay: int) -> torch.Tensor:
    """The MSE head's use of a previous chunk's prefix (NOT real-time chunking: nothing is sampled).

    actions (B, H, A) and prefix (B, P, A) in the same (raw) space, weights W (H,) (fplus.model.rtc.soft_mask:
    1 before `delay`, decaying over the overlap, 0 from H - s on and past P). Returns
    a_i <- W_i prefix_i + (1 - W_i) a_i for i < P, a_i for i >= P, and the first `delay` actions are the prefix's
    bit for bit."""
    p = prefix.shape[1]
    out = actions.clone()
    w = weights[:p].to(actions.dtype)[None, :, None]
    out[:, :p] = w * prefix + (1 - w) * actions[:, :p]
    out[:, :delay] = prefix[:, :delay]
    return out
