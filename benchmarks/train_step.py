"""Samples/s and peak memory of one training step (forward + backward + AdamW) for E0, E1, E2, E4 on the same
batch, and the ratio to E0.

CPU: the tiny backbone. GPU (when available): the full-size Qwen3-VL-2B (and --with-4b: 4B) architecture with
random weights, bf16 autocast, batch 8 and 32, with and without activation checkpointing and LoRA, plus model
FLOPs utilisation (MFU: 6 x trainable-path params x tokens / step time / peak bf16 FLOP/s).

    python benchmarks/train_step.py [--steps 10] [--batch 4] [--image-size 96] [--with-4b]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, markdown_table, write_results  # noqa: E402

from fplus import batch as K  # noqa: E402
from fplus.model.config import PolicyConfig  # noqa: E402
from fplus.model.policy import FPlusPolicy  # noqa: E402
from fplus.settings import ModelSettings  # noqa: E402

EXPERIMENTS = {
    "E0": {},
    "E1": {"prophet": True},
    "E2": {"prophet": True, "injection": True},
    "E4": {"prophet": True, "injection": True, "coc": True, "flare_align": True},
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}
WORLD_DIM, HISTORY, FUTURE, HORIZON, ACTION_DIM, STATE_DIM = 768, 4, 4, 8, 7, 8


def make_batch(b: int, size: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        K.IMAGES: torch.randint(0, 256, (b, size, size, 3), dtype=torch.uint8, generator=g),
        K.INSTRUCTIONS: ["pick up the black bowl next to the plate and place it on the plate"] * b,
        K.STATE: torch.randn(b, STATE_DIM, generator=g),
        K.ACTIONS: torch.randn(b, HORIZON, ACTION_DIM, generator=g),
        K.ACTION_PAD: torch.zeros(b, HORIZON, dtype=torch.bool),
        K.Z_HIST: torch.randn(b, HISTORY, WORLD_DIM, generator=g),
        K.Z_FUTURE: torch.randn(b, FUTURE, WORLD_DIM, generator=g),
        K.FUTURE_VALID: torch.ones(b, FUTURE, dtype=torch.bool),
        K.COC_TEXT: ["approach the bowl because it must be grasped, grasp it, move it over the plate, release"] * b,
    }


def build(backbone: str, flags: dict, size: int, finetune: str, checkpointing: bool, device: str) -> FPlusPolicy:
    stats = {"action": {"mean": np.zeros(ACTION_DIM), "std": np.ones(ACTION_DIM)},
             "state": {"mean": np.zeros(STATE_DIM), "std": np.ones(STATE_DIM)}}
    model = ModelSettings(backbone=backbone, action_horizon=HORIZON, image_size=size, finetune=finetune,
                          gradient_checkpointing=checkpointing, **flags)
    config = PolicyConfig(model=model, action_dim=ACTION_DIM, state_dim=STATE_DIM, world_dim=WORLD_DIM,
                          history=HISTORY, future=FUTURE, coc_mode="joint_after_act", init_seed=0)
    torch.manual_seed(0)
    return FPlusPolicy.build(config, stats, "action", "state", device=device)


def time_steps(policy: FPlusPolicy, batch: dict, steps: int, device: str, bf16: bool) -> tuple[float, float, int]:
    """(median seconds per step, peak memory GiB, tokens per sample)."""
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
    batch = policy.processor(batch, with_coc=True)  # built once, outside the timed loop (the data workers' job)
    prompt = batch[K.PROMPT]
    def ctx():
        return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)

    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with ctx():
            loss, _ = policy(batch, p_oracle=0.5)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return float(np.median(times)), peak, int(prompt.attention_mask.sum(1).float().mean())


def model_flops(policy: FPlusPolicy, tokens: int) -> float:
    """6 N T for the language model (forward + backward) with N its parameter count."""
    n = sum(p.numel() for n_, p in policy.vlm.named_parameters() if "visual" not in n_)
    return 6.0 * n * tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--with-4b", action="store_true")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    rows = []
    if not cuda:
        for finetune in ("full", "lora"):
            base = None
            for name, flags in EXPERIMENTS.items():
                policy = build("tiny", flags, args.image_size, finetune, False, "cpu").train()
                sec, _, tokens = time_steps(policy, make_batch(args.batch, args.image_size, "cpu"), args.steps,
                                            "cpu", False)
                base = base or sec
                rows.append({"backbone": "tiny", "exp": name, "finetune": finetune, "ckpt": "no",
                             "batch": args.batch, "tokens": tokens, "step_ms": sec * 1e3,
                             "samples_per_s": args.batch / sec, "vs_E0": sec / base, "peak_GiB": "n/a", "MFU": "n/a"})
    else:
        gpu = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
        backbones = ["random-qwen3-vl-2b"] + (["random-qwen3-vl-4b"] if args.with_4b else [])
        for backbone in backbones:
            for batch_size in (8, 32):
                for finetune, ckpt in (("full", False), ("full", True), ("lora", False), ("lora", True)):
                    base = None
                    for name, flags in EXPERIMENTS.items():
                        torch.cuda.empty_cache()
                        try:
                            policy = build(backbone, flags, 224, finetune, ckpt, "cuda").train()
                            sec, mem, tokens = time_steps(policy, make_batch(batch_size, 224, "cuda"), args.steps,
                                                          "cuda", True)
                        except torch.OutOfMemoryError:
                            rows.append({"backbone": backbone, "exp": name, "finetune": finetune,
                                         "ckpt": "yes" if ckpt else "no", "batch": batch_size, "step_ms": "OOM"})
                            continue
                        base = base or sec
                        mfu = model_flops(policy, tokens * batch_size) / sec / peak if peak else float("nan")
                        rows.append({"backbone": backbone, "exp": name, "finetune": finetune,
                                     "ckpt": "yes" if ckpt else "no", "batch": batch_size, "tokens": tokens,
                                     "step_ms": sec * 1e3, "samples_per_s": batch_size / sec, "vs_E0": sec / base,
                                     "peak_GiB": mem, "MFU": mfu})
                        del policy
    columns = ["backbone", "exp", "finetune", "ckpt", "batch", "tokens", "step_ms", "samples_per_s", "vs_E0",
               "peak_GiB", "MFU"]
    print(f"training step on {environment()['device']}\n")
    print(markdown_table(rows, columns))
    print(f"\nwrote {write_results('train_step', rows)}")


if __name__ == "__main__":
    main()
