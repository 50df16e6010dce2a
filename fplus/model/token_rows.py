"""Trainable input-embedding rows of the tokens fplus adds: <ACT_i>, <FUT_j> and <STATE> (DESIGN 5).

Under FINETUNE=lora or frozen the backbone's embedding matrix is frozen, so the new tokens would keep their
initial rows for the whole run. `TokenRows` holds their rows as a parameter of the policy (initialised from the
embedding matrix, so the first forward is bit-identical to the plain lookup) and a hook on the input embedding
puts them in at those tokens' positions; only these rows train, the rest of the vocabulary stays as the
fine-tuning mode says. The same in every mode, so the rows train alike under full, frozen and lora.
"""

from __future__ import annotations

import torch
from torch import nn


class TokenRows(nn.Module):
    """Args: token_ids: n token ids. init: (n, d) their initial rows (copied)."""

    def __init__(self, token_ids: list[int], init: torch.Tensor):
        super().__init__()
        if init.shape[0] != len(token_ids):
            raise ValueError(f"{len(token_ids)} token ids but {init.shape[0]} initial rows")
        self.register_buffer("ids", torch.tensor(token_ids, dtype=torch.long), persistent=False)
        self.weight = nn.Parameter(init.detach().clone().float())

    def row(self, token_id: int) -> torch.Tensor:
        """(d,) the current row of one token."""
        return self.weight[self.ids.tolist().index(token_id)]

    def apply(self, input_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """input_ids (B, L), embeds (B, L, d) -> embeds with the rows of these tokens replaced (gradient flows
        into `weight` at their positions only)."""
        match = input_ids.unsqueeze(-1) == self.ids  # (B, L, n)
        found = match.any(-1, keepdim=True)
        # a one-hot matmul, not `weight[index]`: the forward is the same lookup exactly (1 * w + 0 * ... = w), and
        # the gradient match^T @ grad is a GEMM with a fixed summation order, where index_put's accumulation on CPU
        # runs in parallel for long sequences and changed the last bits of the rows from run to run (E4's CoC)
        rows = match.to(self.weight.dtype) @ self.weight  # (B, L, d)
        return torch.where(found, rows.to(embeds.dtype), embeds)
