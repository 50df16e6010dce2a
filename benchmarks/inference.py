"""Latency of `predict_action_chunk` per action chunk (batch 1, p50/p95/p99), eager vs torch.compile (vs CUDA graphs
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


def latency(fn, iters: int, cuda: bool, warmup: int = 3) -> dict[str, float]:
    """{p50_ms, p95_ms, p99_ms, iters} of `iters` calls of `fn` after `warmup` calls (CUDA synchronised)."""
    for _ in range(warmup):
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
    p50, p95, p99 = np.percentile(times, [50, 95, 99]) * 1e3
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99), "iters": iters}


def observation(raw: dict) -> dict:
    """The first sample of a raw batch as one observation (batch 1): image(s), instruction, state and world-latent
    history, as a robot sends it."""
    return {k: v[:1] for k, v in raw.items() if k in (K.IMAGES, K.INSTRUCTIONS, K.STATE, K.Z_HIST)}


def chunk_latency(policy, obs: dict, iters: int, autocast: bool) -> dict:
    """Batch-1 latency of one action chunk, `predict_action_chunk` of an eval-mode policy: "full" (prompt building
    included, what a server does per chunk) and "model_only" (the prompt built beforehand), each {p50_ms, p95_ms,
    p99_ms, iters}, and the prompt's tokens. `autocast`: under bf16 autocast on the policy's device (what `fplus
    eval` runs on CUDA)."""
    policy.eval()
    cuda = policy.device.type == "cuda"
    prepared = policy.processor(obs)
    ctx = partial(torch.autocast, policy.device.type, dtype=torch.bfloat16, enabled=autocast)

    def full():
        with ctx():
            return policy.predict_action_chunk(policy.processor(obs))

    def model_only():
        with ctx():
            return policy.predict_action_chunk(prepared)

    return {"tokens": int(prepared[K.PROMPT].attention_mask.sum()), "full": latency(full, iters, cuda),
            "model_only": latency(model_only, iters, cuda)}


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
        obs = observation(make_batch(1, size, "cpu"))
        measured = chunk_latency(policy, obs, args.iters, autocast=False)
        tokens = measured["tokens"]
        prepared = policy.processor(obs)
        model_only = partial(policy.predict_action_chunk, prepared)
        for name, key in (("eager, incl. prompt building", "full"), ("eager, model only", "model_only")):
            rows.append({"backbone": backbone, "exp": exp, "mode": name, "tokens": tokens,
                         "precision": "bf16 weights" if cuda else "fp32",
                         **{k: measured[key][k] for k in ("p50_ms", "p95_ms", "p99_ms")}})
        if not args.no_compile:
            modes = ["default"] + (["reduce-overhead (CUDA graphs)"] if cuda else [])
            for mode in modes:
                lm = policy.vlm.model.language_model
                try:
                    t0 = time.perf_counter()
                    policy.vlm.model.language_model = torch.compile(lm, mode=mode.split(" ")[0], dynamic=False)
                    model_only()
                    compile_s = time.perf_counter() - t0
                    timed = latency(model_only, args.iters, cuda)
                    rows.append({"backbone": backbone, "exp": exp, "mode": f"torch.compile {mode}, model only",
                                 "tokens": tokens, "p50_ms": timed["p50_ms"], "p95_ms": timed["p95_ms"],
                                 "p99_ms": timed["p99_ms"], "compile_s": compile_s})
                except Exception as err:  # noqa: BLE001 -- report, do not hide
                    rows.append({"backbone": backbone, "exp": exp, "mode": f"torch.compile {mode}",
                                 "p50_ms": f"failed: {type(err).__name__}: {str(err)[:80]}"})
                finally:
                    policy.vlm.model.language_model = lm
    columns = ["backbone", "exp", "mode", "precision", "tokens", "p50_ms", "p95_ms", "p99_ms", "compile_s"]
    print(f"predict_action_chunk latency, batch 1, on {environment()['device']}\n")
    print(markdown_table(rows, columns))
    print(f"\nwrote {write_results('inference', rows)}")


if __name__ == "__main__":
    main()
