"""Latency of `predict_action_chunk` per action chunk (batch 1, p50/p95), eager vs torch.compile (vs CUDA graphs
on GPU), for E0 and E2, and the prompt's tokens per sample at 224 px.

CPU: the tiny backbone. GPU: random-weight Qwen3-VL-2B in bf16.

    python benchmarks/inference.py [--iters 30] [--no-compile]
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, markdown_table, write_results  # noqa: E402
from train_step import build, make_batch  # noqa: E402

from fplus import batch as K  # noqa: E402


def latency(fn, iters: int, cuda: bool) -> tuple[float, float]:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 95) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    backbone, size = ("random-qwen3-vl-2b", 224) if cuda else ("tiny", 224)
    rows = []
    for exp, flags in (("E0", {}), ("E2", {"prophet": True, "injection": True})):
        policy = build(backbone, flags, size, "full", False, device).eval()
        if cuda:
            policy = policy.to(torch.bfloat16)
            policy.action_norm.float()
        obs = {k: v[:1] if torch.is_tensor(v) else v[:1] for k, v in make_batch(1, size, "cpu").items()
               if k in (K.IMAGES, K.INSTRUCTIONS, K.STATE, K.Z_HIST)}
        prepared = policy.processor(obs)
        tokens = int(prepared[K.PROMPT].attention_mask.sum())

        def full(obs=obs, policy=policy):  # prompt building included
            return policy.predict_action_chunk(policy.processor(obs))

        model_only = partial(policy.predict_action_chunk, prepared)
        for name, fn in (("eager, incl. prompt building", full), ("eager, model only", model_only)):
            p50, p95 = latency(fn, args.iters, cuda)
            rows.append({"backbone": backbone, "exp": exp, "mode": name, "tokens": tokens, "p50_ms": p50,
                         "p95_ms": p95})
        if not args.no_compile:
            modes = ["default"] + (["reduce-overhead (CUDA graphs)"] if cuda else [])
            for mode in modes:
                lm = policy.vlm.model.language_model
                try:
                    t0 = time.perf_counter()
                    policy.vlm.model.language_model = torch.compile(lm, mode=mode.split(" ")[0], dynamic=False)
                    model_only()
                    compile_s = time.perf_counter() - t0
                    p50, p95 = latency(model_only, args.iters, cuda)
                    rows.append({"backbone": backbone, "exp": exp, "mode": f"torch.compile {mode}, model only",
                                 "tokens": tokens, "p50_ms": p50, "p95_ms": p95, "compile_s": compile_s})
                except Exception as err:  # noqa: BLE001 -- report, do not hide
                    rows.append({"backbone": backbone, "exp": exp, "mode": f"torch.compile {mode}",
                                 "p50_ms": f"failed: {type(err).__name__}: {str(err)[:80]}"})
                finally:
                    policy.vlm.model.language_model = lm
    columns = ["backbone", "exp", "mode", "tokens", "p50_ms", "p95_ms", "compile_s"]
    print(f"predict_action_chunk latency, batch 1, on {environment()['device']}\n")
    print(markdown_table(rows, columns))
    print(f"\nwrote {write_results('inference', rows)}")


if __name__ == "__main__":
    main()
