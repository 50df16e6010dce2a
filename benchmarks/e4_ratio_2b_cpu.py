"""E4's (and with --with-e2 E2's) training step against E0's at the REAL Qwen3-VL-2B architecture (random init), on
the CPU: does E4 follow its token count there, does COC_FRACTION bring it within 1.25 x E0, is E2 within 1.05 x?
(issue 16, item 5, without a GPU).

At the mid-size stand-in (benchmarks/train_step.py --size mid) the CoC loss's LM head (hidden 512 x 151,936) costs
about 6 backbone tokens per labelled token, so E4 cannot come near E0 there; at 2B it is about 0.2. This measures
the ratio where it matters, as far as a CPU can: the h100 profile's policies (224 px, two cameras, LoRA on the last
16 layers, ALIGN_LAYER 14, no activation checkpointing) with BACKBONE=random-qwen3-vl-2b, the frozen weights stored
in bf16 (what PRECISION=bf16 stores on a GPU) and the steps under CPU bf16 autocast, on a batch of the demo's
instruction and templated CoC label (as --size mid). E0 is built and timed (with --with-e2: E0 and E2 in turn, two
policies resident, ~15 GB), freed, then one E4 policy is timed on its batches in turn: all samples with CoC
(COC_FRACTION=1, unless --no-full) and, for each f of --fractions (empty: no E4), the first ceil(f B) with it (joint:
two backbone passes). Else one 2B policy at a time (~10 GB).

CPU matmuls are not a GPU's, so the ratios are FLOP-share evidence, not GPU timings: the GPU suite measures those.

    python benchmarks/e4_ratio_2b_cpu.py [--batch 4] [--steps 5] [--fractions 0.25] [--no-full] [--out FILE.json]
    (batch 4, 5 steps: ~12 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, markdown_table  # noqa: E402
from train_step import (  # noqa: E402
    DEMO_TASK,
    Run,
    config_batch,
    demo_coc_label,
    interleave,
    policy_from_config,
    profile_config,
    prompt_tokens,
)

from fplus.model.precision import store_frozen  # noqa: E402

BACKBONE = "random-qwen3-vl-2b"


def build(experiment: str, batch: int, backbone: str) -> tuple[object, dict]:
    """(policy with bf16 frozen weights, raw batch) of the h100 profile's `experiment` on `backbone`."""
    small = {} if backbone == BACKBONE else {"ALIGN_LAYER": 2, "LORA_LAYERS": 4}  # a 4-layer check backbone
    _, config, cameras = profile_config("h100", {"EXPERIMENT": experiment, "BACKBONE": backbone,
                                                 "BATCH_SIZE": batch, "FINETUNE": "lora", **small})
    policy = policy_from_config(config, "cpu")
    store_frozen(policy.backbone.model, torch.bfloat16)
    return policy, config_batch(config, batch, cameras, DEMO_TASK, demo_coc_label()[0])


def time_in_turn(runs: dict[str, Run], steps: int, seconds: dict[str, list[float]],
                 facts: dict[str, dict]) -> None:
    """`steps` steps of each run in turn (train_step.interleave, no warm-up: each step is long) into `seconds`,
    and the runs' tokens per sample into `facts`."""
    times, _ = interleave(runs, steps, 0, "cpu", True)
    for name, run in runs.items():
        seconds[name] = times[name]
        facts[name] = {"tokens": prompt_tokens(run.batch)}
        print(f"{name}: {times[name]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each (no warm-up: each is long)")
    parser.add_argument("--fractions", default="0.25", help="comma-separated COC_FRACTION values beside E4's 1")
    parser.add_argument("--no-full", action="store_true", help="leave out E4 at COC_FRACTION=1")
    parser.add_argument("--with-e2", action="store_true", help="also E2, timed in turn with E0 (both resident)")
    parser.add_argument("--out", type=Path, default=RESULTS / "e4_ratio_2b-cpu.json")
    parser.add_argument("--backbone", default=BACKBONE, help="another random backbone (a quick check of the script)")
    args = parser.parse_args()
    t_start = time.perf_counter()
    seconds: dict[str, list[float]] = {}
    facts: dict[str, dict] = {}

    first = {name: Run.prepare(*build(name, args.batch, args.backbone)) for name in ["E0", *(["E2"] if args.with_e2
                                                                                             else [])]}
    time_in_turn(first, args.steps, seconds, facts)  # E0 and E2 in turn (both resident, ~15 GB at the peak)
    del first
    gc.collect()

    fractions = ([] if args.no_full else [1.0]) + [float(f) for f in args.fractions.split(",") if f]
    if fractions:  # one E4 policy, its batches in turn
        policy, raw = build("E4", args.batch, args.backbone)
        time_in_turn({"E4" if f == 1 else f"E4 f={f:g}": Run.prepare(policy, raw, coc_fraction=f) for f in fractions},
                     args.steps, seconds, facts)
    label = demo_coc_label()
    e0 = float(np.median(seconds["E0"]))
    rows, result = [], {"benchmark": "e4_ratio_2b", "environment": environment(),
                        "config": {"backbone": args.backbone, "profile": "h100", "finetune": "lora",
                                   "batch": args.batch,
                                   "precision": "frozen weights bf16, CPU bf16 autocast", "steps": args.steps,
                                   "instruction": DEMO_TASK, "coc_text": label[0], "coc_tokens": label[2],
                                   "timing": "E0 (and E2) in turn, then the E4 variants in turn on one policy"}}
    for name, times in seconds.items():
        med = float(np.median(times))
        result[name] = {"step_s": med, "step_s_all": times, "tokens": facts[name]["tokens"], "vs_E0": med / e0}
        rows.append({"exp": name, "tokens": facts[name]["tokens"], "step_s": med, "vs_E0": f"{med / e0:.3f}"})
    result["wall_s"] = time.perf_counter() - t_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(markdown_table(rows, ["exp", "tokens", "step_s", "vs_E0"]))
    print(f"{result['wall_s']:.0f} s in all; wrote {args.out}")


if __name__ == "__main__":
    main()
