"""The policy's precision (PRECISION), the same in training, validation, offline eval, the closed loop and serving.

On CUDA with PRECISION=bf16: the frozen backbone weights are stored in bf16 (half the memory, and autocast no
longer re-casts them at every forward); the trainable weights (LoRA adapters, the added token rows, the heads, the
Prophet, a fully fine-tuned backbone) stay float32 for the optimiser; every forward runs under bf16 autocast. On
CPU, or with PRECISION=fp32, everything is float32 and no autocast applies.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def bf16_on(precision: str, device: torch.device | str) -> bool:
    """Whether a policy of this PRECISION computes in bf16 on `device` (CUDA only)."""
    return precision == "bf16" and torch.device(device).type == "cuda"


def store_frozen(module: nn.Module, dtype: torch.dtype) -> int:
    """Cast the frozen (requires_grad=False) floating-point parameters of `module` to `dtype` in place; buffers
    (rotary frequencies, normalisation statistics) are left as they are. Returns how many were cast."""
    count = 0
    for p in module.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            count += 1
    return count


def autocast_for(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA under PRECISION=bf16, else nothing (float32)."""
    if bf16_on(precision, device):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def in_policy_precision(method: Callable) -> Callable:
    """Decorate a policy method so that it runs under the policy's autocast (`self.config.model.precision` on
    `self.device`): training, validation and every inference path compute alike."""
    @functools.wraps(method)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        with autocast_for(self.config.model.precision, self.device):
            return method(self, *args, **kwargs)

    return wrapped
