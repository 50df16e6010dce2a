"""Sharded training (FSDP2) through accelerate, on GPUs and on CPU (gloo), with checkpoints that hold the full
weights whatever the sharding.

FSDP2 on CPU: accelerate picks FSDP only on an accelerator. On CPU its state is MULTI_CPU (DDP over gloo) and
ACCELERATE_USE_FSDP, the FSDP_* variables and even an explicit `fsdp_plugin` are ignored, although torch's
`fully_shard` runs on CPU with gloo; accelerate has no variable or plugin option that changes this (1.15). So
`make_accelerator` turns such a run (ACCELERATE_USE_FSDP=true and FSDP_VERSION=2, as `accelerate launch
--config_file profiles/accelerate/fsdp.yaml` sets them, with several processes and no mixed precision) into
accelerate's own FSDP2 run: the plugin accelerate builds from the same variables, and the distributed type FSDP.
Everything after that (`prepare`: fully_shard by the config's wrap policy; gradient clipping of DTensors; no_sync
under GRAD_ACCUM) is accelerate's FSDP2 code, the one a GPU run executes, which is what the CPU test exercises.

Checkpoints under FSDP2: every process takes part in gathering the full (unsharded) weights and the full optimiser
state (torch.distributed.checkpoint.state_dict, full_state_dict, offloaded to the CPU of process 0 only), and
process 0 writes the files a one-process run writes: the policy's safetensors hold the same keys and shapes, so a
checkpoint loads in one process (`FPlusPolicy.load`, `fplus eval`). The optimiser state in trainer.pt is then
keyed by parameter name (not by index, as torch's `Optimizer.state_dict` keys it) and marked with
`optimizer_format` = "fsdp2-full"; on resume every process reads the full files and keeps its shards. One process
and DDP are left exactly as they were (the optimiser's own state_dict).

DeepSpeed (GPU only: accelerate runs it on accelerators only): accelerate leaves the micro batch `auto` to be taken
from a prepared data loader (the recipe prepares none) and clips at 1.0; `prepare` sets both from the settings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fplus.errors import CheckpointError, ConfigError

FSDP_OPTIMIZER_FORMAT = "fsdp2-full"
"""trainer.pt `optimizer_format` of a checkpoint saved under FSDP2 (absent otherwise)."""
FORWARD_METHODS = ("predict", "predict_modes")
"""Policy methods called instead of forward (validation, evaluation): FSDP2 must gather the weights for them too."""


def _fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def make_accelerator(**kwargs: Any):
    """`accelerate.Accelerator(**kwargs)`; on CPU with FSDP requested (see the module docstring), switched to
    accelerate's FSDP2 path.

    Raises:
        ConfigError: FSDP on CPU with FSDP_VERSION 1 (FSDP1 is not supported there: use fsdp_version: 2).
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    acc = Accelerator(**kwargs)
    if acc.distributed_type != DistributedType.MULTI_CPU or not _fsdp_requested():
        return acc
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables, as accelerate reads them on GPUs
    if plugin.fsdp_version != 2:
        raise ConfigError(f"FSDP on CPU needs FSDP2, the accelerate config sets fsdp_version {plugin.fsdp_version} "
                          "(FSDP_VERSION): set `fsdp_version: 2` in its fsdp_config")
    if acc.mixed_precision != "no":
        raise ConfigError(f"FSDP on CPU trains in float32 only, not with mixed precision {acc.mixed_precision}")
    acc.state.fsdp_plugin = plugin
    acc.state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP  # as AcceleratorState records it on GPUs
    return acc


def is_fsdp2(acc) -> bool:
    """The model is sharded with FSDP2 (its parameters are DTensors)."""
    return bool(acc.is_fsdp2)


def prepare(acc, model: nn.Module, optimizer: torch.optim.Optimizer, batch_size: int,
            max_grad_norm: float) -> tuple[nn.Module, Any]:
    """`acc.prepare(model, optimizer)`. Under DeepSpeed the config's batch size and clipping first come from the
    settings (`deepspeed_settings`); under FSDP2 FORWARD_METHODS are registered, so that calling them outside
    forward gathers the sharded weights first."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.DEEPSPEED:
        deepspeed_settings(acc.state.deepspeed_plugin.deepspeed_config, batch_size, max_grad_norm)
    model, optimizer = acc.prepare(model, optimizer)
    if is_fsdp2(acc):
        from torch.distributed.fsdp import register_fsdp_forward_method

        for name in FORWARD_METHODS:
            register_fsdp_forward_method(model, name)
    return model, optimizer


def deepspeed_settings(config: dict[str, Any], batch_size: int, max_grad_norm: float) -> dict[str, Any]:
    """Set the DeepSpeed config's `auto` values accelerate cannot derive here: train_micro_batch_size_per_gpu
    (accelerate takes it from a prepared data loader, the recipe prepares none) = BATCH_SIZE, and gradient_clipping
    (accelerate's `auto` is 1.0) = MAX_GRAD_NORM (DeepSpeed clips inside its step). Returns `config`, changed.

    Raises:
        ConfigError: the config sets another value than the settings (the run would train with it silently).
    """
    for key, value, setting in (("train_micro_batch_size_per_gpu", batch_size, "BATCH_SIZE"),
                                ("gradient_clipping", max_grad_norm, "MAX_GRAD_NORM")):
        given = config.get(key, "auto")
        if given == "auto":
            config[key] = value
        elif given != value:
            raise ConfigError(f"the DeepSpeed config sets {key} {given} but {setting} is {value}: remove {key} "
                              f"from the config (it follows {setting}) or set {setting}={given}")
    return config


def full_tensor(value: Any) -> torch.Tensor:
    """A DTensor (the gradient norm accelerate returns under FSDP2) as its full value; a tensor or number as a
    tensor."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else torch.as_tensor(value)


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(acc, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Under FSDP2 the full state dict of `model` (on CPU) on the main process and {} on the others; every process
    must call it (it gathers). Otherwise None: the model's own state is complete on every process."""
    if not is_fsdp2(acc):
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def optimizer_state(acc, model: nn.Module, optimizer) -> dict[str, Any]:
    """The optimiser state for trainer.pt: under FSDP2 the full state keyed by parameter name (on CPU, main process
    only, every process must call it); otherwise the optimiser's own state_dict."""
    if not is_fsdp2(acc):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, _inner(optimizer), options=_full_options())


def optimizer_format(acc) -> dict[str, str]:
    """The trainer.pt entries that say how its optimiser state is keyed ({} for the optimiser's own state_dict)."""
    return {"optimizer_format": FSDP_OPTIMIZER_FORMAT} if is_fsdp2(acc) else {}


def load_weights(acc, model: nn.Module, directory: Path) -> None:
    """Load a checkpoint's policy/ (`FPlusPolicy.save`) into the prepared model; under FSDP2 every process reads
    the full weights and keeps its shards (every process must call it)."""
    policy = acc.unwrap_model(model)
    if not is_fsdp2(acc):
        policy.load_weights(directory)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, policy.read_weights(directory),
                         options=StateDictOptions(full_state_dict=True, strict=False))


def load_optimizer(acc, model: nn.Module, optimizer, trainer: dict[str, Any], path: Path) -> None:
    """Load trainer.pt's optimiser state, refusing one saved under another sharding (FSDP2 vs not)."""
    saved = trainer.get("optimizer_format")  # absent: the optimiser's own state_dict (one process, DDP)
    wanted = FSDP_OPTIMIZER_FORMAT if is_fsdp2(acc) else None
    if saved != wanted:
        where = {FSDP_OPTIMIZER_FORMAT: "under FSDP2 (profiles/accelerate/fsdp.yaml)", None: "without FSDP"}
        raise CheckpointError(f"{path / 'trainer.pt'} was saved {where.get(saved, repr(saved))} and this run "
                              f"trains {where[wanted]}: resume it with the accelerate config it was trained with")
    if wanted is None:
        optimizer.load_state_dict(trainer["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, _inner(optimizer), trainer["optimizer"],
                             options=StateDictOptions(full_state_dict=True))


def _inner(optimizer) -> torch.optim.Optimizer:
    """The torch optimiser inside accelerate's AcceleratedOptimizer."""
    return getattr(optimizer, "optimizer", optimizer)
