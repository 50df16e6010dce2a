"""CPU rehearsal of the l40s profile (issue 16, item 10): the profile's policy with the REAL Qwen3-VL-2B architecture
at random init, its frozen weights stored in bf16 and the compute under CPU bf16 autocast, LoRA as the profile sets
it (LORA_LAYERS, LORA_RANK, GRADIENT_CHECKPOINTING, ALIGN_LAYER), 2 training steps (forward + backward + gradient
clipping + AdamW) on a synthetic batch of the profile's BATCH_SIZE at its IMAGE_SIZE, and 1 evaluation batch (the
validation pass: `predict_modes` under every corruption mode). Not in CI: it takes minutes and ~10 GB of memory.

The settings are the profile's (`load_settings("l40s", ...)`) with BACKBONE replaced by its random twin
(fplus.memory.RELEASED: Qwen/Qwen3-VL-2B-Instruct -> random-qwen3-vl-2b) and EXPERIMENT set (default E4, the
largest of the matrix); the dataset's dimensions are LIBERO's (action 7, state 8), the world latents DINOv2-base's
(768), the images two cameras (IMAGE_KEY + WRIST_IMAGE_KEY) when the profile has a wrist camera.
The policy is built as `fplus train` builds it (fp32 on the CPU), then its frozen backbone parameters are cast to bf16
(fplus.model.precision.store_frozen: what PRECISION=bf16 stores on a GPU); trainable ones (LoRA, token rows, heads)
stay fp32. The policy autocasts only on CUDA, so the rehearsal runs its steps under CPU bf16 autocast itself.

Recorded per phase: wall time, the peak resident memory during the phase (getrusage's ru_maxrss, which Linux keeps
as the process's VmHWM: both are reset to the current RSS between phases by writing 5 to /proc/self/clear_refs) and
the resident memory after it; and the peak of the whole run (the largest phase peak: the fp32 build's).
Writes benchmarks/results/l40s_rehearsal-cpu.json and prints a table.

    python benchmarks/l40s_rehearsal.py [--batch N] [--experiment E0|E2|E4] [--steps 2] [--profile l40s] [--out F]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, markdown_table  # noqa: E402
from train_step import (  # noqa: E402
    COC_TEXT,
    INSTRUCTION,
    config_batch,
    model_facts,
    one_step,
    policy_from_config,
    profile_config,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from fplus.memory import RELEASED, estimate_memory  # noqa: E402
from fplus.model.backbone import resolve_name  # noqa: E402
from fplus.model.config import PolicyConfig  # noqa: E402
from fplus.model.corruption import MODES  # noqa: E402
from fplus.model.policy import FPlusPolicy  # noqa: E402
from fplus.model.precision import store_frozen  # noqa: E402
from fplus.settings import Settings, load_settings  # noqa: E402

GIB = 2**30


def rss_gib() -> float:
    """Resident memory now (/proc/self/status VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / GIB  # kB
    raise RuntimeError("no VmRSS in /proc/self/status")


def reset_peak() -> bool:
    """Reset the peak resident memory (VmHWM, and with it ru_maxrss) to the current RSS (Linux >= 4.0: write 5 to
    /proc/self/clear_refs); False where refused (then each phase's peak is the peak so far)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def max_rss_gib() -> float:
    """The process's peak resident memory since the start or the last `reset_peak` (getrusage ru_maxrss, kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def rehearsal_config(profile: str, experiment: str, batch: int | None,
                     backbone: str | None = None) -> tuple[Settings, PolicyConfig, int]:
    """(settings, policy config, cameras) of the profile with `backbone` (default: the random twin of its own),
    EXPERIMENT, and BATCH_SIZE when given (train_step.profile_config)."""
    if backbone is None:
        base = load_settings(profile)
        source = resolve_name(base.model.backbone)
        if source not in RELEASED:
            raise SystemExit(f"profile {profile}: BACKBONE={base.model.backbone} has no random twin in "
                             f"fplus.memory.RELEASED ({', '.join(RELEASED)}); pass --backbone")
        backbone = RELEASED[source]
    overrides = {"BACKBONE": backbone, "EXPERIMENT": experiment}
    if batch is not None:
        overrides["BATCH_SIZE"] = batch
    return profile_config(profile, overrides)


class Phases:
    """Times phases and records their memory; `run(name, fn)` returns fn()."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.resets = reset_peak()

    def run(self, name: str, fn):
        reset_peak()
        t0 = time.perf_counter()
        value = fn()
        seconds, peak = time.perf_counter() - t0, max_rss_gib()
        self.rows.append({"phase": name, "seconds": seconds, "peak_rss_GiB": peak, "rss_after_GiB": rss_gib()})
        print(f"  {name}: {seconds:.1f} s, peak RSS {peak:.2f} GiB", flush=True)
        return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="l40s")
    parser.add_argument("--experiment", default="E4", choices=("E0", "E2", "E4"))
    parser.add_argument("--batch", type=int, default=None, help="BATCH_SIZE (default: the profile's)")
    parser.add_argument("--steps", type=int, default=2, help="training steps")
    parser.add_argument("--backbone", default=None, help="instead of the profile's random twin (e.g. "
                        "random-qwen3-vl-mid with --experiment E2, to try the script in a minute)")
    parser.add_argument("--note", default=None, help="free text recorded in the JSON (e.g. why --batch was reduced)")
    parser.add_argument("--out", type=Path, default=RESULTS / "l40s_rehearsal-cpu.json")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    t_start = time.perf_counter()
    phases = Phases()
    s, config, cameras = phases.run("settings", lambda: rehearsal_config(args.profile, args.experiment, args.batch,
                                                                             args.backbone))
    m, b = s.model, s.train.batch_size
    print(f"{args.profile} rehearsal on the CPU ({torch.get_num_threads()} threads): {m.backbone} {args.experiment}, "
          f"{m.finetune} (last {m.lora_layers} layers, rank {m.lora_rank}), checkpointing "
          f"{m.gradient_checkpointing}, batch {b} x {cameras} camera(s) at {m.image_size} px", flush=True)

    def build() -> FPlusPolicy:
        policy = policy_from_config(config, "cpu")
        store_frozen(policy.backbone.model, torch.bfloat16)  # what FPlusPolicy.to does on CUDA under PRECISION=bf16
        return policy.train()

    policy = phases.run("build (fp32, then frozen -> bf16)", build)
    facts = model_facts(policy)

    def prompts() -> tuple[dict, dict]:
        raw = config_batch(config, b, cameras, INSTRUCTION, COC_TEXT)
        train = policy.processor(raw, with_coc=True, coc_fraction=s.coc.fraction)
        evaluation = policy.processor({**raw, "episode_index": [i % 2 for i in range(b)]})
        return train, evaluation

    train_batch, eval_batch = phases.run("prompt building (train + eval batch)", prompts)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=s.train.lr_backbone,
                            weight_decay=s.train.weight_decay)
    losses = []
    for step in range(args.steps):
        _, metrics = phases.run(f"train step {step + 1}", lambda: one_step(
            policy, train_batch, opt, "cpu", True, p_oracle=s.train.p_oracle_start,
            max_grad_norm=s.train.max_grad_norm))
        losses.append({k: float(v) for k, v in metrics.items()})  # 0-d tensors (read once, after the step)

    def evaluate() -> dict:
        generators = {mode: torch.Generator().manual_seed(i) for i, mode in enumerate(MODES)}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            preds, _ = policy.predict_modes(eval_batch, MODES, generators)
        return {mode: bool(torch.isfinite(p).all()) for mode, p in preds.items()}

    finite_eval = phases.run("eval batch (every corruption mode)", evaluate)
    estimate = estimate_memory(s, world_dim=config.world_dim, action_dim=config.action_dim, state_dim=config.state_dim)
    result = {
        "benchmark": "l40s_rehearsal", "environment": environment(),
        "config": {"profile": args.profile, "experiment": args.experiment, "backbone": m.backbone,
                   "finetune": m.finetune, "lora_layers": m.lora_layers, "lora_rank": m.lora_rank,
                   "gradient_checkpointing": m.gradient_checkpointing, "align_layer": m.align_layer,
                   "batch": b, "batch_overridden": args.batch is not None, "cameras": cameras,
                   "image_size": m.image_size, "steps": args.steps, "precision": "frozen weights bf16, CPU bf16 "
                   "autocast; trainable weights fp32", "tokens_per_sample": int(
                       train_batch["prompt"].attention_mask.sum(1).float().mean()),
                   "dims": {"action": config.action_dim, "state": config.state_dim, "world": config.world_dim}},
        "model": facts,
        "phases": phases.rows,
        "train_metrics": losses,
        "losses_finite": all(math.isfinite(x["loss"]) for x in losses),
        "eval_finite": finite_eval,
        "peak_rss_GiB": max(r["peak_rss_GiB"] for r in phases.rows),
        "peak_rss_phase": max(phases.rows, key=lambda r: r["peak_rss_GiB"])["phase"],
        "per_phase_peaks": phases.resets,
        "doctor_estimate_GiB": {"total": estimate.total / GIB, "components": estimate.components()},
        "wall_s": time.perf_counter() - t_start,
        "note": args.note,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print("\n" + markdown_table(phases.rows, ["phase", "seconds", "peak_rss_GiB", "rss_after_GiB"]))
    print(f"\nattention {facts['attn_implementation']}, weights {facts['weight_dtypes']}, "
          f"{facts['params'] / 1e9:.2f} B params ({facts['trainable_params'] / 1e6:.1f} M trainable); losses "
          + ", ".join(f"{x['loss']:.3f}" for x in losses) + f"; eval finite {finite_eval}")
    print(f"peak RSS of the run {result['peak_rss_GiB']:.2f} GiB ({result['peak_rss_phase']}); the doctor's "
          f"estimate (GPU, one process) {result['doctor_estimate_GiB']['total']:.2f} GiB; "
          f"{result['wall_s']:.0f} s in all; wrote {args.out}")


if __name__ == "__main__":
    main()
