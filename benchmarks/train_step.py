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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, markdown_table, write_results  # noqa: E402

from fplus import batch as K  # noqa: E402
from fplus import memory  # noqa: E402
from fplus.model.config import PolicyConfig  # noqa: E402
from fplus.model.policy import FPlusPolicy  # noqa: E402
from fplus.model.tiny import RANDOM_SIZES  # noqa: E402
from fplus.settings import ModelSettings, Settings, load_settings  # noqa: E402

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


def make_batch(b: int, size: int, device: str, instruction: str = INSTRUCTION, coc_text: str = COC_TEXT, *,
               horizon: int = HORIZON, action_dim: int = ACTION_DIM, state_dim: int = STATE_DIM,
               world_dim: int = WORLD_DIM, history: int = HISTORY, future: int = FUTURE, cameras: int = 1) -> dict:
    """A seeded synthetic raw batch of `b` samples (keys of fplus.batch): images (b, size, size, 3) uint8 (or
    (b, C, size, size, 3) for C > 1 cameras), state (b, S), actions (b, H, A), z_hist (b, T, D), z_future (b, K, D),
    instructions and CoC texts. `device` is unused (batches are built on the CPU, as the data workers build them)."""
    g = torch.Generator().manual_seed(0)
    shape = (b, size, size, 3) if cameras == 1 else (b, cameras, size, size, 3)
    return {
        K.IMAGES: torch.randint(0, 256, shape, dtype=torch.uint8, generator=g),
        K.INSTRUCTIONS: [instruction] * b,
        K.STATE: torch.randn(b, state_dim, generator=g),
        K.ACTIONS: torch.randn(b, horizon, action_dim, generator=g),
        K.ACTION_PAD: torch.zeros(b, horizon, dtype=torch.bool),
        K.Z_HIST: torch.randn(b, history, world_dim, generator=g),
        K.Z_FUTURE: torch.randn(b, future, world_dim, generator=g),
        K.FUTURE_VALID: torch.ones(b, future, dtype=torch.bool),
        K.COC_TEXT: [coc_text] * b,
    }


def config_batch(config: PolicyConfig, b: int, cameras: int = 1, instruction: str = INSTRUCTION,
                 coc_text: str = COC_TEXT) -> dict:
    """`make_batch` with the dimensions of a policy config (image size, H, A, S, D, T, K)."""
    return make_batch(b, config.model.image_size, "cpu", instruction, coc_text, horizon=config.model.action_horizon,
                      action_dim=config.action_dim, state_dim=config.state_dim or STATE_DIM,
                      world_dim=config.world_dim or WORLD_DIM, history=config.history, future=config.future,
                      cameras=cameras)


def demo_coc_label(budget: int | None = None) -> tuple[str, str, int]:
    """(text, style, tokens) of the templated CoC label of DEMO_TASK: the richest style within `budget` tokens
    (default: the demo's COC_MAX_TOKENS), counted with the demo backbone's (`tiny`) tokenizer, as `fplus coc
    generate` chooses it."""
    from fplus.coc.phases import Phase
    from fplus.coc.template import fit_text
    from fplus.coc.tokens import load_token_counter

    counter = load_token_counter("tiny")
    budget = budget or load_settings("demo").coc.max_tokens
    text, style = fit_text(DEMO_TASK, [Phase(*p) for p in DEMO_PHASES], lambda t: counter.count(t) <= budget)
    return text, style, counter.count(text)


def build(backbone: str, flags: dict, size: int, finetune: str, checkpointing: bool, device: str,
          coc_mode: str = "joint_after_act") -> FPlusPolicy:
    """A policy of the experiment `flags` on unit statistics. A full-size random backbone gets LoRA on its last
    layers // 2 + 2 layers (16 of 28 for 2B, as the l40s and h100 profiles), so that E4's alignment at the middle
    layer reaches adapted weights; the others keep LORA_LAYERS' default."""
    layers = RANDOM_SIZES[backbone][0]["num_hidden_layers"] if backbone in RANDOM_SIZES else 0
    model = ModelSettings(backbone=backbone, action_horizon=HORIZON, image_size=size, finetune=finetune,
                          gradient_checkpointing=checkpointing,
                          lora_layers=max(ModelSettings().lora_layers, layers // 2 + 2), **flags)
    config = PolicyConfig(model=model, action_dim=ACTION_DIM, state_dim=STATE_DIM, world_dim=WORLD_DIM,
                          history=HISTORY, future=FUTURE, coc_mode=coc_mode, init_seed=0)
    return policy_from_config(config, device)


def policy_from_config(config: PolicyConfig, device: str) -> FPlusPolicy:
    """`FPlusPolicy.build` with unit action/state statistics (seed 0), as the recipe builds it."""
    stats = {"action": {"mean": np.zeros(config.action_dim), "std": np.ones(config.action_dim)},
             "state": {"mean": np.zeros(config.state_dim or STATE_DIM), "std": np.ones(config.state_dim or STATE_DIM)}}
    torch.manual_seed(0)
    return FPlusPolicy.build(config, stats, "action", "state" if config.state_dim else None, device=device)


def profile_config(profile: str, overrides: dict) -> tuple[Settings, PolicyConfig, int]:
    """A profile's settings with `overrides`, the PolicyConfig of its experiment on LIBERO-like dimensions
    (fplus.memory's ACTION_DIM, STATE_DIM and WORLD_DIMS of its WORLD_SOURCE), and its cameras (2 with a
    WRIST_IMAGE_KEY)."""
    s = load_settings(profile, overrides)
    config = PolicyConfig.from_settings(s, action_dim=memory.ACTION_DIM,
                                        state_dim=memory.STATE_DIM if s.data.state_key else None,
                                        world_dim=memory.WORLD_DIMS[s.world.source])
    return s, config, 1 + (s.data.wrist_image_key is not None)


def model_facts(policy: FPlusPolicy) -> dict:
    """What the built model actually uses, read off it: the attention implementation of its text and vision
    towers (`config._attn_implementation`) and the dtypes of its frozen and trainable parameters."""
    config = policy.vlm.config
    frozen = sorted({str(p.dtype).removeprefix("torch.") for p in policy.parameters() if not p.requires_grad})
    trainable = sorted({str(p.dtype).removeprefix("torch.") for p in policy.parameters() if p.requires_grad})
    return {"attn_implementation": {"text": config.get_text_config()._attn_implementation,
                                    "vision": config.vision_config._attn_implementation},
            "weight_dtypes": {"frozen": frozen, "trainable": trainable},
            "params": sum(p.numel() for p in policy.parameters()),
            "trainable_params": sum(p.numel() for p in policy.parameters() if p.requires_grad)}


def one_step(policy: FPlusPolicy, batch: dict, opt: torch.optim.Optimizer, device: str, bf16: bool,
             p_oracle: float = 0.5, max_grad_norm: float | None = None) -> tuple[float, dict[str, float]]:
    """(seconds, metrics) of one training step (forward + backward [+ clipping] + AdamW) on a processed batch, under
    bf16 autocast on `device`'s type when `bf16` (CUDA synchronised)."""
    ctx = torch.autocast("cuda" if device == "cuda" else "cpu", dtype=torch.bfloat16, enabled=bf16)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with ctx:
        loss, metrics = policy(batch, p_oracle=p_oracle)
    loss.backward()
    if max_grad_norm is not None:
        metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(
            [p for p in policy.parameters() if p.requires_grad], max_grad_norm))
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, metrics


def prompt_tokens(batch: dict) -> int:
    """Mean prompt tokens per sample (visual + text + ACT/FUT + CoC) of a processed batch (all its passes)."""
    prompt = batch[K.PROMPT]
    return int(sum(int(p.attention_mask.sum()) for p in prompt.parts) / prompt.num_samples)


def time_steps(policy: FPlusPolicy, batch: dict, steps: int, device: str, bf16: bool) -> tuple[float, float, int]:
    """(median seconds per step, peak memory GiB, tokens per sample)."""
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
    batch = policy.processor(batch, with_coc=True)  # built once, outside the timed loop (the data workers' job)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [one_step(policy, batch, opt, device, bf16)[0] for _ in range(steps + 2)][2:]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return float(np.median(times)), peak, prompt_tokens(batch)


@dataclass
class Run:
    """One experiment's policy, its processed batch and optimiser, timed by `interleave`."""

    policy: FPlusPolicy
    batch: dict
    opt: torch.optim.Optimizer
    trainable: int

    @classmethod
    def prepare(cls, policy: FPlusPolicy, raw_batch: dict, lr: float = 1e-5, coc_fraction: float = 1.0) -> Run:
        """Train mode, the prompt built once (the data workers' job, outside the timed steps; CoC text on the first
        ceil(coc_fraction x B) samples, as COC_FRACTION does), a fresh AdamW."""
        policy.train()
        trainable = [p for p in policy.parameters() if p.requires_grad]
        prompt = policy.processor(raw_batch, with_coc=True, coc_fraction=coc_fraction)
        return cls(policy, prompt, torch.optim.AdamW(trainable, lr=lr),
                   sum(p.numel() for p in trainable))

    def resident_bytes(self) -> int:
        """Bytes of this run's CUDA tensors between steps: parameters, buffers and optimiser state."""
        tensors = [*self.policy.parameters(), *self.policy.buffers()]
        tensors += [v for state in self.opt.state.values() for v in state.values() if torch.is_tensor(v)]
        seen = {t.data_ptr(): t.numel() * t.element_size() for t in tensors if t.is_cuda}
        return sum(seen.values())


def interleave(runs: dict[str, Run], steps: int, warmup: int, device: str, bf16: bool,
               deadline: float | None = None) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Time the runs round robin (step i of each, then step i + 1, ...), so that noise hits all alike.

    Returns ({name: seconds of each timed step}, {name: peak GiB}); CUDA only, else {}: the largest memory
    allocated during that run's timed steps, less what the OTHER runs held meanwhile, i.e. what it would take
    alone. Stops after fewer timed steps (at least one) once `deadline` (time.perf_counter()) has passed."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    peaks: dict[str, float] = {}
    for i in range(warmup + steps):
        if i > warmup and deadline is not None and time.perf_counter() > deadline:
            break
        for name, run in runs.items():
            if device == "cuda":
                others = torch.cuda.memory_allocated() - run.resident_bytes()
                torch.cuda.reset_peak_memory_stats()
            sec, _ = one_step(run.policy, run.batch, run.opt, device, bf16)
            if i >= warmup:
                times[name].append(sec)
                if device == "cuda":
                    peaks[name] = max(peaks.get(name, 0.0), (torch.cuda.max_memory_allocated() - others) / 2**30)
    return times, peaks


def step_stats(seconds: list[float]) -> dict:
    """{step_ms (the median), min_ms, max_ms, step_ms_all} of timed steps."""
    ms = [t * 1e3 for t in seconds]
    return {"step_ms": float(np.median(ms)), "min_ms": min(ms), "max_ms": max(ms), "step_ms_all": ms}


def ratios(times: dict[str, list[float]], base: str = "E0") -> dict[str, dict[str, float]]:
    """Step-time ratios to `base` of interleaved timings: of the medians ("ratios"), the medians of the per-round
    ratios ("ratios_paired": each round's steps ran back to back, under about the same load) and of the fastest
    steps ("ratios_min": the least disturbed by other load on a shared machine)."""
    others = [n for n in times if n != base]
    b = np.array(times[base])
    return {"ratios": {f"{n}/{base}": float(np.median(times[n]) / np.median(b)) for n in others},
            "ratios_paired": {f"{n}/{base}": float(np.median(np.array(times[n]) / b)) for n in others},
            "ratios_min": {f"{n}/{base}": float(min(times[n]) / b.min()) for n in others}}


def run_mid(steps: int, batch_size: int, size: int, warmup: int, out: Path, fractions: list[float] = (),
            budgets: list[int] = ()) -> None:
    """--size mid: E0, E2, E4 built once and timed interleaved; prints a table, writes `out`. Each of `fractions`
    adds E4 variants with COC_FRACTION=f in both CoC modes (`E4 f=0.25`, `E4 separate f=0.25`), each of `budgets`
    (a shorter COC_MAX_TOKENS: the demo's label re-templated to fit) `E4 tok=N f=<smallest fraction or 1>`."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = device == "cuda"
    t_start = time.perf_counter()
    coc_text, coc_style, coc_tokens = demo_coc_label()
    raw = make_batch(batch_size, size, device, DEMO_TASK, coc_text)
    runs = {name: Run.prepare(build(MID, EXPERIMENTS[name], size, "lora", False, device), raw)
            for name in MID_EXPERIMENTS}
    labels: dict[str, dict] = {}
    for f in fractions:
        runs[f"E4 f={f:g}"] = Run.prepare(build(MID, EXPERIMENTS["E4"], size, "lora", False, device), raw,
                                          coc_fraction=f)
        runs[f"E4 separate f={f:g}"] = Run.prepare(build(MID, EXPERIMENTS["E4"], size, "lora", False, device,
                                                         coc_mode="separate"), raw, coc_fraction=f)
    for budget in budgets:
        text, style, tokens = demo_coc_label(budget)
        f = min(fractions, default=1.0)
        name = f"E4 tok={budget} f={f:g}"
        runs[name] = Run.prepare(build(MID, EXPERIMENTS["E4"], size, "lora", False, device),
                                 make_batch(batch_size, size, device, DEMO_TASK, text), coc_fraction=f)
        labels[name] = {"coc_text": text, "coc_style": style, "coc_tokens": tokens}
    built_s = time.perf_counter() - t_start
    times, _ = interleave(runs, steps, warmup, device, bf16)
    result: dict = {"benchmark": "train_step_mid", "environment": environment(),
                    "config": {"backbone": MID, "finetune": "lora", "batch": batch_size, "image_size": size,
                               "precision": "bf16" if bf16 else "fp32", "steps": steps, "warmup": warmup,
                               "timing": "interleaved round robin E0, E2, E4 per step; step_ms is the median",
                               "instruction": DEMO_TASK, "coc_text": coc_text, "coc_style": coc_style,
                               "coc_tokens": coc_tokens, "coc_fractions": list(fractions),
                               "coc_budgets": labels}}
    rows = []
    for name, run in runs.items():
        stats = step_stats(times[name])
        result[name] = {"step_ms": stats["step_ms"], "tokens": prompt_tokens(run.batch),
                        "samples_per_s": batch_size / stats["step_ms"] * 1e3, "min_ms": stats["min_ms"],
                        "max_ms": stats["max_ms"], "step_ms_all": stats["step_ms_all"],
                        "trainable_params": run.trainable}
        rows.append({"exp": name, **{k: v for k, v in result[name].items() if k != "step_ms_all"}})
    result.update(ratios(times))
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


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 FLOP/s of a known GPU (PEAK_BF16, matched by substring), else None."""
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


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
    parser.add_argument("--coc-fraction", type=float, action="append", default=[],
                        help="mid: also time E4 with COC_FRACTION=F, joint and separate (repeatable)")
    parser.add_argument("--coc-max-tokens", type=int, action="append", default=[],
                        help="mid: also time E4 with the demo label re-templated under N tokens (repeatable)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    size = args.size or ("full" if cuda else "tiny")
    if size == "full" and not cuda:
        parser.error("--size full needs a CUDA GPU (use --size tiny or mid on CPU)")
    if size == "mid":
        slug = "gpu" if cuda else "cpu"
        run_mid(args.steps or 6, args.batch, args.image_size or 224, args.warmup,
                args.out or RESULTS / f"train_step_mid-{slug}.json", args.coc_fraction, args.coc_max_tokens)
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
        peak = peak_flops(gpu)
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
