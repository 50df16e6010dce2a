"""fplus.model.precision: on CUDA with PRECISION=bf16 the frozen backbone weights are stored in bf16 and every policy
forward runs under bf16 autocast; trainable weights stay float32. The CUDA decision is tested as a function of the
device; the bf16 storage itself is exercised on CPU under CPU autocast (the same casts and dtypes)."""

import contextlib

import torch

from fplus.model.precision import autocast_for, bf16_on, store_frozen
from tests.model.test_policy import make, make_batch


def test_bf16_only_on_cuda_and_only_with_precision_bf16():
    assert bf16_on("bf16", "cuda") and bf16_on("bf16", torch.device("cuda:1"))
    assert not bf16_on("bf16", "cpu") and not bf16_on("fp32", "cuda")
    assert isinstance(autocast_for("bf16", "cpu"), contextlib.nullcontext)
    assert isinstance(autocast_for("bf16", "cuda"), torch.autocast)


def test_lora_policy_stores_frozen_weights_in_bf16_and_trains_its_adapters_in_fp32():
    policy = make(finetune="lora", lora_layers=1, lora_rank=2, prophet=True, injection=True).train()
    frozen = [n for n, p in policy.backbone.model.named_parameters() if not p.requires_grad]
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert frozen and any("lora" in n for n in trainable)
    cast = store_frozen(policy.backbone.model, torch.bfloat16)
    assert cast == len(frozen)
    assert all(p.dtype == torch.bfloat16 for p in policy.backbone.model.parameters() if not p.requires_grad)
    assert all(p.dtype == torch.float32 for p in policy.parameters() if p.requires_grad)
    # a buffer (e.g. the rotary frequencies) keeps its dtype
    assert all(b.dtype != torch.bfloat16 for b in policy.backbone.model.buffers() if b.is_floating_point())
    batch = policy.processor(make_batch(), with_coc=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = policy(batch, p_oracle=0.5)
    loss.backward()
    assert torch.isfinite(loss)
    # lora_B starts at 0 (so lora_A's gradient is 0 at step 0): B's gradient proves the path through bf16 weights
    grads = [p.grad for n, p in policy.named_parameters() if p.requires_grad and "lora_B" in n]
    assert grads and all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)
    assert store_frozen(policy.backbone.model, torch.bfloat16) == 0, "idempotent"
