"""Corruption of the future memory at evaluation (DESIGN 6): how much does the policy rely on it?

    none     the memory as the policy computes it (Prophet prediction)
    zero     all zeros
    random   Gaussian noise with the per-dimension mean and std of the world latents
    shuffle  the batch's memories permuted so that no sample keeps its own (needs B >= 2)
    oracle   the true future latents z[t+1 .. t+K]
"""

from __future__ import annotations

import torch

from fplus.errors import FplusError

MODES = ("none", "zero", "random", "shuffle", "oracle")


def derangement(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random permutation of range(n) with no fixed point (n >= 2): a random cyclic shift of a shuffled order."""
    if n < 2:
        raise FplusError("shuffle corruption needs a batch of at least 2 samples")
    order = torch.randperm(n, generator=generator)
    shift = int(torch.randint(1, n, (1,), generator=generator))
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(shift)
    return perm


def corrupt_memory(mode: str, predicted: torch.Tensor, oracle: torch.Tensor | None, latent_mean: torch.Tensor,
                   latent_std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The memory (B, K, D) to inject under `mode`.

    Args:
        predicted: (B, K, D) Prophet output. oracle: (B, K, D) true future latents (needed for `oracle`).
        latent_mean, latent_std: (D,) statistics of the world latents (for `random`).
    """
    if mode == "none":
        return predicted
    if mode == "zero":
        return torch.zeros_like(predicted)
    if mode == "random":
        noise = torch.randn(predicted.shape, generator=generator, dtype=torch.float32).to(predicted.device)
        return (latent_mean.float() + latent_std.float() * noise).to(predicted.dtype)
    if mode == "shuffle":
        perm = derangement(predicted.shape[0], generator).to(predicted.device)
        return predicted[perm]
    if mode == "oracle":
        if oracle is None:
            raise FplusError("oracle corruption needs the true future latents (z_future) in the batch")
        return oracle.to(predicted.dtype)
    raise FplusError(f"unknown corruption mode {mode!r}; valid: {', '.join(MODES)}")
