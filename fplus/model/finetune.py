"""Which weights train, and seeded module initialisation (do-no-harm: a module's initial weights depend only on
(INIT_SEED, its name), whatever else an experiment adds)."""

from __future__ import annotations

import zlib
from contextlib import contextmanager

import torch

from fplus.model.backbone import Backbone


def module_seed(init_seed: int, name: str) -> int:
    """The seed of one module's initialisation: a function of INIT_SEED and the module's name only."""
    return (init_seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


@contextmanager
def seeded(init_seed: int, name: str):
    """Draw from a generator seeded by (init_seed, name) inside the block; the global stream is left unchanged."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(module_seed(init_seed, name))
        yield


def apply_finetune(backbone: Backbone, mode: str, lora_rank: int, lora_layers: int,
                   gradient_checkpointing: bool, init_seed: int = 0) -> None:
    """Set which backbone weights train: `full` (all), `frozen` (none) or `lora` (peft LoRA on the attention and
    MLP projections of the last `lora_layers` decoder layers; everything else frozen). The added tokens' rows
    train in every mode, through the policy's TokenRows."""
    if gradient_checkpointing:  # renamed in transformers 5.2x; older 5.x only has the gradient_* name
        kwargs = {"use_reentrant": False}
        if hasattr(backbone.model, "activation_checkpointing_enable"):
            backbone.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            backbone.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if mode == "full":
        backbone.model.requires_grad_(True)
        return
    backbone.model.requires_grad_(False)
    if mode == "frozen":
        return
    from peft import LoraConfig, get_peft_model

    first = max(0, backbone.num_layers - lora_layers)
    layer_ids = "|".join(str(i) for i in range(first, backbone.num_layers))
    target = (rf".*language_model\.layers\.({layer_ids})\."
              r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))")
    config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=target,
                        bias="none", init_lora_weights=True)
    with seeded(init_seed, "lora"):
        backbone.model = get_peft_model(backbone.model, config)
