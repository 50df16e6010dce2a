"""Gated cross-attention that injects the future memory into the ACT hidden states only (DESIGN 5).

    out = act_h + tanh(gate) * CrossAttn(q = LN(act_h), k = v = proj(memory))

`gate` starts at exactly 0, so at initialisation `out` equals `act_h` bit for bit (do-no-harm), while the gate
itself still gets the gradient <dL/d out, attn> and can open.
"""

from __future__ import annotations

import torch
from torch import nn


class GatedCrossAttention(nn.Module):
    """Args: hidden_size: d (ACT hidden states). latent_dim: D (memory). heads: attention heads (divides d)."""

    def __init__(self, hidden_size: int, latent_dim: int, heads: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.memory_proj = nn.Sequential(nn.LayerNorm(latent_dim), nn.Linear(latent_dim, hidden_size))
        self.attn = nn.MultiheadAttention(hidden_size, heads, batch_first=True)
        self.gate = nn.Parameter(torch.zeros(1))  # one element, not 0-d: FSDP2's fully_shard refuses 0-d parameters

    def forward(self, act_h: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """act_h (B, H, d), memory (B, K, D) -> (B, H, d)."""
        kv = self.memory_proj(memory.to(act_h.dtype))
        attn, _ = self.attn(self.norm(act_h), kv, kv, need_weights=False)
        return act_h + torch.tanh(self.gate).to(attn.dtype) * attn

    def gate_tensor(self) -> torch.Tensor:
        """tanh(gate) as a detached 1-element tensor on the gate's device (no host sync, for metrics)."""
        return torch.tanh(self.gate.detach())

    @property
    def gate_value(self) -> float:
        """tanh(gate): the fraction of the attention output that reaches the ACT states."""
        return float(self.gate_tensor())
