"""Samples/s and peak memory of one training step (forward + backward + AdamW) for E0, E1, E2, E4 on the same
batch, and the ratio to E0.

--size tiny (the CPU default): the tiny backbone, full fine-tuning and LoRA. --size full (the GPU default): the
full-size Qwen3-VL-2B (and --with-4b: 4B) architecture with random weights, bf16 autocast, batch 8 and 32, with and
without activation checkpointing and LoRA, plus model FLOPs utilisation (MFU: 6 x trainable-path params x tokens /
step time / peak bf16 FLOP/s).

--size mid: `random-qwen3-vl-mid` (text hidden 512 x 4 layers, vision 256 x 4, the released 151,936-token
vocabulary), LoRA, batch 4 at 224 px (fp32 on CPU, bf16 autocast on GPU), for E0, E2 and E4 with the demo's
instruction and templated CoC label (`fplus.coc.template.fit_text` under the demo's COC_MAX_TOKENS). The three
policies are built once and timed INTERLEAVED (step i of E0, E2, E4, then step i + 1, ...), so that the noise of a
shared machine hits all three alike. It writes {"E0": {"step_ms" (the median), "tokens", ...}, "E2": ..., "E4": ...,
"ratios": {"E2/E0", "E4/E0"} (of the medians), "ratios_paired" (the medians of the per-round ratios),
"ratios_min" (of the fastest steps)} and the environment to --out (default
benchmarks/results/train_step_mid-<cpu|gpu>.json).

    python benchmarks/train_step.py [--size tiny|mid|full] [--steps N] [--batch 4] [--image-size PX] [--with-4b]
                                    [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, markdown_table, write_results  # noqa: E402

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
INSTRUCTION = "pick up the black bowl next to the plate and place it on the plate"
COC_TEXT = "approach the bowl because it must be grasped, grasp it, move it over the plate, release"
MID = "random-qwen3-vl-mid"
MID_EXPERIMENTS = ("E0", "E2", "E4")
# --size mid's labels: the demo's drawer-open-v3 instruction and its two CoC phases (the hand moves up to the drawer,
# then pulls it down), as `fplus coc generate --profile demo` segments a scripted episode of it
DEMO_TASK = "pull the drawer open by its handle"
DEMO_PHASES = (("approach", 0, 18, "up"), ("contact", 18, 60, "down"))


def make_batch(b: int, size: int, device: str, instruction: str = INSTRUCTION, coc_text: str = COC_TEXT) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        K.IMAGES: torch.randint(0, 256, (b, size, size, 3), dtype=torch.uint8, generator=g),
        K.INSTRUCTIONS: [instruction] * b,
        K.STATE: torch.randn(b, STATE_DIM, generator=g),
        K.ACTIONS: torch.randn(b, HORIZON, ACTION_DIM, generator=g),
        K.ACTION_PAD: torch.zeros(b, HORIZON, dtype=torch.bool),
        K.Z_HIST: torch.randn(b, HISTORY, WORLD_DIM, generator=g),
        K.Z_FUTURE: torch.randn(b, FUTURE, WORLD_DIM, generator=g),
        K.FUTURE_VALID: torch.ones(b, FUTURE, dtype=torch.bool),
        K.COC_TEXT: [coc_text] * b,
    }


def demo_coc_label() -> tuple[str, str, int]:
    """(text, style, tokens) of the templated CoC label of DEMO_TASK: the richest style within the demo's
    COC_MAX_TOKENS, counted with the demo backbone's (`tiny`) tokenizer, as `fplus coc generate` chooses it."""
    from fplus.coc.phases import Phase
    from fplus.coc.template import fit_text
    from fplus.coc.tokens import load_token_counter
    from fplus.settings import load_settings

    counter = load_token_counter("tiny")
    budget = load_settings("demo").coc.max_tokens
    text, style = fit_text(DEMO_TASK, [Phase(*p) for p in DEMO_PHASES], lambda t: counter.count(t) <= budget)
    return text, style, counter.count(text)


def build(backbone: str, flags: dict, size: int, finetune: str, checkpointing: bool, device: str) -> FPlusPolicy:
    stats = {"action": {"mean": np.zeros(ACTION_DIM), "std": np.ones(ACTION_DIM)},
             "state": {"mean": np.zeros(STATE_DIM), "std": np.ones(STATE_DIM)}}
    model = ModelSettings(backbone=backbone, action_horizon=HORIZON, image_size=size, finetune=finetune,
                          gradient_checkpointing=checkpointing, **flags)
    config = PolicyConfig(model=model, action_dim=ACTION_DIM, state_dim=STATE_DIM, world_dim=WORLD_DIM,
                          history=HISTORY, future=FUTURE, coc_mode="joint_after_act", init_seed=0)
    torch.manual_seed(0)
    return FPlusPolicy.build(config, stats, "action", "state", device=device)


def one_step(policy: FPlusPolicy, batch: dict, opt: torch.optim.Optimizer, device: str, bf16: bool) -> float:
    """Seconds of one training step (forward + backward + AdamW) on a processed batch (CUDA synchronised)."""
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with ctx:
        loss, _ = policy(batch, p_oracle=0.5)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def prompt_tokens(batch: dict) -> int:
    """Mean prompt tokens per sample (visual + text + ACT/FUT + CoC) of a processed batch."""
    return int(batch[K.PROMPT].attention_mask.sum(1).float().mean())


def time_steps(policy: FPlusPolicy, batch: dict, steps: int, device: str, bf16: bool) -> tuple[float, float, int]:
    """(median seconds per step, peak memory GiB, tokens per sample)."""
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
    batch = policy.processor(batch, with_coc=True)  # built once, outside the timed loop (the data workers' job)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [one_step(policy, batch, opt, device, bf16) for _ in range(steps + 2)][2:]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return float(np.median(times)), peak, prompt_tokens(batch)


def run_mid(steps: int, batch_size: int, size: int, warmup: int, out: Path) -> None:
    """--size mid: E0, E2, E4 built once and timed interleaved; prints a table, writes `out`."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = device == "cuda"
    t_start = time.perf_counter()
    coc_text, coc_style, coc_tokens = demo_coc_label()
    runs = {}
    for name in MID_EXPERIMENTS:
        policy = build(MID, EXPERIMENTS[name], size, "lora", False, device).train()
        batch = policy.processor(make_batch(batch_size, size, device, DEMO_TASK, coc_text), with_coc=True)
        opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
        trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        runs[name] = (policy, batch, opt, trainable)
    built_s = time.perf_counter() - t_start
    times: dict[str, list[float]] = {name: [] for name in MID_EXPERIMENTS}
    for i in range(warmup + steps):
        for name, (policy, batch, opt, _) in runs.items():  # round robin: step i of each experiment
            sec = one_step(policy, batch, opt, device, bf16)
            if i >= warmup:
                times[name].append(sec)
    result: dict = {"benchmark": "train_step_mid", "environment": environment(),
                    "config": {"backbone": MID, "finetune": "lora", "batch": batch_size, "image_size": size,
                               "precision": "bf16" if bf16 else "fp32", "steps": steps, "warmup": warmup,
                               "timing": "interleaved round robin E0, E2, E4 per step; step_ms is the median",
                               "instruction": DEMO_TASK, "coc_text": coc_text, "coc_style": coc_style,
                               "coc_tokens": coc_tokens}}
    rows = []
    for name, (_, batch, _, trainable) in runs.items():
        ms = [t * 1e3 for t in times[name]]
        step_ms = float(np.median(ms))
        result[name] = {"step_ms": step_ms, "tokens": prompt_tokens(batch), "samples_per_s": batch_size / step_ms * 1e3,
                        "min_ms": min(ms), "max_ms": max(ms), "step_ms_all": ms, "trainable_params": trainable}
        rows.append({"exp": name, **{k: v for k, v in result[name].items() if k != "step_ms_all"}})
    result["ratios"] = {f"{n}/E0": result[n]["step_ms"] / result["E0"]["step_ms"] for n in ("E2", "E4")}
    # the median of the per-round ratios: each round's steps ran back to back, under about the same machine load
    result["ratios_paired"] = {f"{n}/E0": float(np.median(np.array(times[n]) / np.array(times["E0"])))
                               for n in ("E2", "E4")}
    # of the fastest steps: the least disturbed by other load on a shared machine
    result["ratios_min"] = {f"{n}/E0": result[n]["min_ms"] / result["E0"]["min_ms"] for n in ("E2", "E4")}
    result["wall_s"] = time.perf_counter() - t_start
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"training step of {MID} (LoRA, batch {batch_size}, {size} px) on {result['environment']['device']}, "
          f"{steps} interleaved steps after {warmup} warm-up; CoC label ({coc_style}, {coc_tokens} tokens): "
          f"{coc_text!r}\n")
    print(markdown_table(rows, ["exp", "tokens", "trainable_params", "step_ms", "min_ms", "max_ms", "samples_per_s"]))
    print("\nratios of the medians: " + "  ".join(f"{k} {v:.3f}" for k, v in result["ratios"].items())
          + "; medians of the per-round ratios: "
          + "  ".join(f"{k} {v:.3f}" for k, v in result["ratios_paired"].items()) + "; of the fastest steps: "
          + "  ".join(f"{k} {v:.3f}" for k, v in result["ratios_min"].items()))
    print(f"\nbuilt in {built_s:.0f} s, {result['wall_s']:.0f} s in all; wrote {out}")


def model_flops(policy: FPlusPolicy, tokens: int) -> float:
    """6 N T for the language model (forward + backward) with N its parameter count."""
    n = sum(p.numel() for n_, p in policy.vlm.named_parameters() if "visual" not in n_)
    return 6.0 * n * tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "mid", "full"), default=None,
                        help="backbone size (default: tiny on CPU, full on GPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 10; mid: 6)")
    parser.add_argument("--warmup", type=int, default=1, help="mid: untimed steps of each experiment first")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=None, help="tiny: default 96; mid: 224")
    parser.add_argument("--with-4b", action="store_true")
    parser.add_argument("--out", type=Path, default=None,
                        help="mid: the JSON file to write (default benchmarks/results/train_step_mid-<cpu|gpu>.json)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    size = args.size or ("full" if cuda else "tiny")
    if size == "full" and not cuda:
        parser.error("--size full needs a CUDA GPU (use --size tiny or mid on CPU)")
    if size == "mid":
        slug = "gpu" if cuda else "cpu"
        run_mid(args.steps or 6, args.batch, args.image_size or 224, args.warmup,
                args.out or RESULTS / f"train_step_mid-{slug}.json")
        return
    args.steps = args.steps or 10
    args.image_size = args.image_size or 96
    rows = []
    if size == "tiny":
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
