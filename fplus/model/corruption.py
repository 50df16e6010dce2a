"""Corruption of the future memory at evaluation (DESIGN 6): how much does the policy rely on it?

All memories live in the standardised latent space (fplus.model.latent_norm): per dimension, mean 0 and std 1
over the training split.

    none     the memory as the policy computes it (Prophet prediction)
    zero     all zeros (the training mean)
    random   Gaussian noise with the latents' statistics: N(0, 1) per dimension in the standardised space
    shuffle  the memory of a sample from another episode (never the same episode a few frames away)
    oracle   the true future latents z[t+1 .. t+K]
    history  z_t repeated K times: what the present alone gives (diagnostic)

`oracle - none` measures the value of the true future; `none - history` the value of the prediction over the
present.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fplus.errors import ConfigError

MODES = ("none", "zero", "random", "shuffle", "oracle", "history")


def shuffle_donors(episodes: Sequence[int],
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Donors for `shuffle`: (perm (B,), ok (B,) bool); sample i takes the memory of sample perm[i], which is of
    another episode where ok[i]. None when no sample can get another episode's memory (B < 2, one episode).

    Samples are grouped by episode (groups in random order, random order inside each group) and the grouped order
    is rotated by the size of the largest group: every sample lands on another episode as long as no episode holds
    more than half of the batch; beyond that, the surplus of the largest episode is not ok.
    """
    n = len(episodes)
    if n < 2 or len(set(episodes)) < 2:
        return None
    ids = sorted(set(episodes))
    largest = max(sum(1 for e in episodes if e == i) for i in ids)
    group_order = [ids[i] for i in torch.randperm(len(ids), generator=generator).tolist()]
    rank = {e: r for r, e in enumerate(group_order)}
    within = torch.randperm(n, generator=generator).tolist()
    order = sorted(range(n), key=lambda i: (rank[episodes[i]], within[i]))
    perm = torch.empty(n, dtype=torch.long)
    for j, i in enumerate(order):
        perm[i] = order[(j + largest) % n]
    ok = torch.tensor([episodes[int(perm[i])] != episodes[i] for i in range(n)])
    return perm, ok


def corrupt_memory(mode: str, predicted: torch.Tensor, oracle: torch.Tensor | None = None,
                   present: torch.Tensor | None = None, donors: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The memory (B, K, D) to inject under `mode`, in the standardised latent space.

    Args:
        predicted: (B, K, D) Prophet output. oracle: (B, K, D) true future latents (needed for `oracle`).
        present: (B, D) z_t (needed for `history`). donors: (B,) long, sample i takes the memory of sample
            donors[i] (needed for `shuffle`; from `shuffle_donors`, so that donors are of other episodes).
    """
    if mode == "none":
        return predicted
    if mode == "zero":
        return torch.zeros_like(predicted)
    if mode == "random":
        noise = torch.randn(predicted.shape, generator=generator, dtype=torch.float32)
        return noise.to(device=predicted.device, dtype=predicted.dtype)
    if mode == "shuffle":
        if donors is None:
            raise ConfigError("shuffle corruption needs donors from other episodes (fplus.model.corruption."
                             "shuffle_donors); in closed loop pass another rollout's memory instead")
        return predicted[donors.to(predicted.device)]
    if mode == "oracle":
        if oracle is None:
            raise ConfigError("oracle corruption needs the true future latents (z_future) in the batch")
        return oracle.to(predicted.dtype)
    if mode == "history":
        if present is None:
            raise ConfigError("history corruption needs the present latent z_t (z_hist) in the batch")
        return present.to(predicted.dtype)[:, None].expand_as(predicted).clone()
    raise ConfigError(f"unknown corruption mode {mode!r}; valid: {', '.join(MODES)}")
