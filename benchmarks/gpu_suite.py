"""The GPU suite (issue 16, item 9): one run that measures what the targets below are about, on one H100/H200.

Parts, in this order, each timed against an overall budget (a part that the budget left cannot cover is skipped,
its reason recorded; one that fails records its error; the JSON is rewritten after every part, so it always exists):

  train_lora  E0, E2, E4 with LoRA: step time (forward + backward + AdamW, bf16 autocast), peak memory and MFU at
              batch 8 of the h100 profile's policies (224 px, two cameras, LoRA on the last 16 layers, ALIGN_LAYER
              14, no activation checkpointing) on random-weight Qwen3-VL-2B, and `E4 f=0.25`: E4 with
              COC_FRACTION=0.25; the policies built once and timed interleaved (step i of each, then step i + 1),
              ratios E2/E0, E4/E0 and E4 f=0.25/E0 (benchmarks/train_step.py). Every batch has the demo's
              instruction and its templated CoC label (train_step.demo_coc_label), as the mid-size benchmark.
  inference   batch-1 latency per action chunk (p50/p95/p99) of the same three policies in eval mode, bf16 autocast
              on CUDA as `fplus eval` runs; with prompt building ("full") and without (benchmarks/inference.py).
  train_full  as train_lora with full fine-tuning (interleaved when the three fit in memory together, else one
              after another: "timing" says which).
  latents     world-latent precompute rate, frames/s of the encoders alone (DINOv2-base, V-JEPA 2 ViT-L at
              256 px), fp32 (what `fplus latents` runs) and bf16 autocast (benchmarks/latents.py).

What the built models use is read off them (attention implementation, frozen and trainable weight dtypes), never
assumed. MFU = 6 x language-model params x tokens per step / step time / the GPU's dense bf16 peak
(train_step.PEAK_BF16, or --peak-tflops). Peak memory is CUDA's max allocated during a run's timed steps less what
the other interleaved runs held (what the run needs alone).

Targets (checked on H100/H200 only, `targets_apply`): E2 <= 1.05 x E0, E4 <= 1.25 x E0 (LoRA and full; with LoRA
also E4 f=0.25), inference
p50 <= 20 ms per chunk (prompt building included), MFU >= 40 % for full fine-tuning.

The random backbone is built once and saved (its random init takes a minute), and every policy loads it from there.

--smoke: the demo profile's tiny backbone and tiny encoders on any device (CPU here), batch 2, 2 steps: proves the
suite end to end in well under 2 minutes (tests/test_gpu_suite.py).

    python benchmarks/gpu_suite.py [--smoke] [--budget-s 450] [--peak-tflops X] [--out FILE.json]
    (on a GPU machine without a registry: benchmarks/gpu_suite.sh WHEELHOUSE)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, markdown_table  # noqa: E402
from inference import chunk_latency, observation  # noqa: E402
from latents import encoder_only  # noqa: E402
from train_step import (  # noqa: E402
    DEMO_TASK,
    HORIZON,
    Run,
    config_batch,
    demo_coc_label,
    interleave,
    model_facts,
    model_flops,
    peak_flops,
    policy_from_config,
    profile_config,
    prompt_tokens,
    ratios,
    step_stats,
)

from fplus.model.backbone import load_backbone, save_backbone  # noqa: E402
from fplus.model.policy import FPlusPolicy  # noqa: E402

NAMES = ("E0", "E2", "E4")
COC_FRACTION = 0.25
FRACTION_NAME = f"E4 f={COC_FRACTION:g}"  # train_lora only: E4 with COC_FRACTION (its CoC rows run apart)
MAX_RATIO = {"E2/E0": 1.05, "E4/E0": 1.25, f"{FRACTION_NAME}/E0": 1.25}
MAX_P50_MS = 20.0
MIN_MFU = 0.40
TARGET_GPUS = ("H100", "H200")


@dataclass(frozen=True)
class Sizes:
    """What one mode measures: the policies of `profile` (its image size, cameras, LoRA layers, align layer,
    checkpointing, precision) with `backbone` and `batch`. needs_s: seconds of budget a part needs to start."""

    profile: str
    backbone: str
    batch: int
    steps: int
    warmup: int
    iters: int
    encoders: tuple[tuple[str, str, int], ...]  # (source, model id, clips per batch)
    encoder_repeats: int
    needs_s: dict[str, float]


FULL = Sizes("h100", "random-qwen3-vl-2b", 8, 10, 2, 100,
             (("dino", "random-dinov2-base", 64), ("vjepa", "random-vjepa2-vitl", 8)), 10,
             {"train_lora": 120, "inference": 30, "train_full": 150, "latents": 40})
SMOKE = Sizes("demo", "tiny", 2, 2, 1, 5, (("dino", "tiny", 4), ("vjepa", "tiny", 2)), 2,
              {"train_lora": 5, "inference": 2, "train_full": 5, "latents": 2})
PARTS = ("train_lora", "inference", "train_full", "latents")


class HardStop(Exception):
    """SIGTERM (gpu_suite.sh's hard time limit) arrived during a part."""


def _on_term(signum, frame):
    raise HardStop(f"stopped by signal {signum} (the hard time limit of gpu_suite.sh)")


class Suite:
    """Runs the parts against the budget and keeps the JSON at `out` up to date."""

    def __init__(self, sizes: Sizes, smoke: bool, budget_s: float, out: Path, peak: float | None):
        self.sizes, self.out, self.peak = sizes, out, peak
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.start = time.perf_counter()
        self.end = self.start + budget_s
        self.kept: dict[str, tuple[FPlusPolicy, dict]] = {}  # train_lora's policies and batches, for inference
        self.coc_text, coc_style, coc_tokens = demo_coc_label()  # every batch's CoC label (E4 trains on it)
        self._saved: Path | None = None  # the random backbone, built once and saved (see `backbone`)
        self._fallback = False  # the saved backbone could not be loaded: policies build the random one
        self._tmp: Path | None = None  # the temporary directory of the saved backbone
        env = environment()
        if self.device == "cuda":
            env["gpu_memory_GiB"] = torch.cuda.get_device_properties(0).total_memory / 2**30
        self.result: dict = {
            "benchmark": "gpu_suite", "mode": "smoke" if smoke else "full", "environment": env,
            "config": {**asdict(sizes), "experiments": list(NAMES), "budget_s": budget_s,
                       "instruction": DEMO_TASK, "coc_text": self.coc_text, "coc_style": coc_style,
                       "coc_tokens": coc_tokens, "lora_variants": {FRACTION_NAME: {"COC_FRACTION": COC_FRACTION}},
                       "peak_flops": peak, "precision": "bf16 autocast" if self.device == "cuda" else "fp32"},
            "parts": {}}

    def left(self) -> float:
        return self.end - time.perf_counter()

    def write(self) -> None:
        self.result["wall_s"] = time.perf_counter() - self.start
        self.result["targets"], self.result["targets_apply"] = self.targets()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(finite(self.result), indent=2, allow_nan=False))
        tmp.replace(self.out)

    def part(self, name: str, fn: Callable[[float], dict]) -> None:
        """Run one part (fn gets its deadline, time.perf_counter()) or record why not; then write the JSON."""
        later = sum(self.sizes.needs_s[p] for p in PARTS[PARTS.index(name) + 1:])
        need, left = self.sizes.needs_s[name], self.left()
        parts = self.result["parts"]
        if left < need:
            parts[name] = {"status": "skipped", "reason": f"{left:.0f} s of the budget left; the part needs about "
                                                          f"{need:.0f} s (raise --budget-s / GPU_SUITE_BUDGET_S)"}
        else:
            parts[name] = {"status": "running"}
            self.write()
            t0 = time.perf_counter()
            try:
                parts[name] = {"status": "done", **fn(max(self.end - later, t0 + need))}
            except HardStop as err:
                parts[name] = {"status": "failed", "error": str(err)}
                raise
            except Exception as err:  # noqa: BLE001 -- recorded in the JSON, the next parts still run
                parts[name] = {"status": "failed", "error": one_line(err),
                               "traceback": traceback.format_exc().splitlines()[-12:]}
            finally:
                parts[name]["seconds"] = time.perf_counter() - t0
        if name != "train_lora":  # train_lora's policies serve the inference part only
            self.kept.clear()
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
        self.write()
        print(f"[{self.result['wall_s']:6.0f} s] {name}: {parts[name]['status']}"
              + "".join(f" ({parts[name][k]})" for k in ("reason", "error") if k in parts[name]), flush=True)

    @property
    def backbone(self) -> str:
        """The BACKBONE the policies load: the random architecture built ONCE (its random init is slow: a minute on
        one CPU core for 2B) and saved with save_backbone, so that each policy loads it with from_pretrained (the
        path of downloaded weights) instead of initialising it again; the random name itself after `_fallback`."""
        if self._fallback:
            return self.sizes.backbone
        if self._saved is None:
            t0 = time.perf_counter()
            self._tmp = Path(tempfile.mkdtemp(prefix="fplus-gpu-suite-"))  # removed by close(), whatever happens
            directory = self._tmp / self.sizes.backbone
            save_backbone(load_backbone(self.sizes.backbone, action_horizon=HORIZON, num_fut_tokens=0,
                                        use_state=False), directory)
            self._saved = directory
            self.result["config"]["backbone_saved_s"] = time.perf_counter() - t0
        return str(self._saved)

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    # ----- parts -------------------------------------------------------------------------------------------------

    def policy(self, name: str, finetune: str) -> tuple[FPlusPolicy, dict]:
        """(policy, raw batch) of experiment `name` with `finetune`, from the profile's settings."""
        overrides = {"EXPERIMENT": name.split()[0], "FINETUNE": finetune, "BATCH_SIZE": self.sizes.batch}
        try:
            _, config, cameras = profile_config(self.sizes.profile, {**overrides, "BACKBONE": self.backbone})
            policy = policy_from_config(config, self.device)
        except ImportError as err:  # e.g. transformers 5.17's AutoImageProcessor wants torchvision to load a saved one
            if self._fallback:
                raise
            self._fallback = True
            self.result["config"]["backbone_saved_fallback"] = (
                f"loading the saved backbone failed ({one_line(err)}): each policy initialises the random one")
            _, config, cameras = profile_config(self.sizes.profile, {**overrides, "BACKBONE": self.backbone})
            policy = policy_from_config(config, self.device)
        return policy, config_batch(config, self.sizes.batch, cameras, DEMO_TASK, self.coc_text)

    def train(self, finetune: str, deadline: float) -> dict:
        """E0, E2, E4 (and FRACTION_NAME with LoRA) with `finetune`: built, then timed interleaved (one after another
        when they don't fit)."""
        s, cuda = self.sizes, self.device == "cuda"
        names = (*NAMES, FRACTION_NAME) if finetune == "lora" else NAMES
        built: dict[str, float] = {}
        raws: dict[str, dict] = {}

        def prepare(name: str) -> Run:
            t0 = time.perf_counter()
            policy, raws[name] = self.policy(name, finetune)
            run = Run.prepare(policy, raws[name], coc_fraction=COC_FRACTION if name == FRACTION_NAME else 1.0)
            built[name] = time.perf_counter() - t0
            return run

        first = prepare(names[0])
        together = fits_together(first, len(names)) if cuda else True
        groups = [list(names)] if together else [[n] for n in names]
        times: dict[str, list[float]] = {}
        out: dict = {"finetune": finetune, "timing": "interleaved round robin, step_ms is the median" if together
                     else "one experiment after another (the three do not fit in memory together)",
                     "experiments": {}}
        for group in groups:
            runs = {n: first if n == names[0] else prepare(n) for n in group}
            # an equal share of the time left for each group still to run
            share = (deadline - time.perf_counter()) / (len(groups) - groups.index(group))
            group_times, peaks = interleave(runs, s.steps, s.warmup, self.device, cuda, time.perf_counter() + share)
            for n, run in runs.items():
                times[n] = group_times[n]
                out["experiments"][n] = self.train_record(run, group_times[n], peaks.get(n), built[n])
            if finetune == "lora":
                self.kept.update({n: (run.policy, raws[n]) for n, run in runs.items() if n in NAMES})
            del runs
            first = None
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        n = min(len(t) for t in times.values())
        out.update(ratios({k: v[:n] for k, v in times.items()}))
        return out

    def train_record(self, run: Run, seconds: list[float], peak_gib: float | None, build_s: float) -> dict:
        stats = step_stats(seconds)
        tokens = prompt_tokens(run.batch)
        flops = model_flops(run.policy, tokens * self.sizes.batch)
        return {**stats, "steps": len(seconds), "tokens": tokens,
                "samples_per_s": self.sizes.batch / stats["step_ms"] * 1e3, "peak_GiB": peak_gib,
                "flops_per_step": flops, "mfu": flops / (stats["step_ms"] / 1e3) / self.peak if self.peak else None,
                "build_s": build_s, **model_facts(run.policy)}

    def inference(self, deadline: float) -> dict:
        """Batch-1 chunk latency of E0, E2, E4 (LoRA): train_lora's policies, or fresh ones."""
        s, out = self.sizes, {"precision": "bf16 autocast" if self.device == "cuda" else "fp32", "experiments": {}}
        for name in NAMES:
            if time.perf_counter() > deadline:
                out["experiments"][name] = {"skipped": "the part's share of the budget ran out"}
                continue
            policy, raw = self.kept.pop(name, None) or self.policy(name, "lora")
            measured = chunk_latency(policy, observation(raw), s.iters, autocast=self.device == "cuda")
            out["experiments"][name] = {**measured["full"], "tokens": measured["tokens"],
                                        "model_only": measured["model_only"], **model_facts(policy)}
            del policy, raw
            gc.collect()
        return out

    def latents(self, deadline: float) -> dict:
        s, rows = self.sizes, []
        for source, model_id, batch in s.encoders:
            for dtype in ("fp32", "bf16") if self.device == "cuda" else ("fp32",):
                if time.perf_counter() > deadline:
                    break
                rows.append(encoder_only(source, model_id, batch, self.device, dtype, s.encoder_repeats))
        return {"rows": rows}

    # ----- targets and table ---------------------------------------------------------------------------------------

    def targets(self) -> tuple[list[dict], bool]:
        """[{name, value, op, limit, pass}] of every target whose number was measured; and whether they apply
        (a full run on an H100/H200)."""
        parts, found = self.result["parts"], []

        def check(name: str, value: float, op: str, limit: float) -> None:
            found.append({"name": name, "value": value, "op": op, "limit": limit,
                          "pass": value <= limit if op == "<=" else value >= limit})

        for part in ("train_lora", "train_full"):
            for key, limit in MAX_RATIO.items():
                if key in parts.get(part, {}).get("ratios", {}):
                    check(f"{part} {key}", parts[part]["ratios"][key], "<=", limit)
        for name, rec in parts.get("train_full", {}).get("experiments", {}).items():
            if rec.get("mfu") is not None:
                check(f"train_full {name} MFU", rec["mfu"], ">=", MIN_MFU)
        for name, rec in parts.get("inference", {}).get("experiments", {}).items():
            if "p50_ms" in rec:
                check(f"inference {name} p50_ms", rec["p50_ms"], "<=", MAX_P50_MS)
        device = self.result["environment"]["device"]
        return found, self.result["mode"] == "full" and any(g in device for g in TARGET_GPUS)

    def table(self) -> str:
        rows = []
        for part in ("train_lora", "train_full"):
            for name, r in self.result["parts"].get(part, {}).get("experiments", {}).items():
                rows.append({"part": part, "exp": name, "tokens": r["tokens"], "step_ms": r["step_ms"],
                             "peak_GiB": r["peak_GiB"] if r["peak_GiB"] is not None else "n/a",
                             "MFU_%": 100 * r["mfu"] if r["mfu"] is not None else "n/a",
                             "attn": r["attn_implementation"]["text"],
                             "frozen/trainable": f"{','.join(r['weight_dtypes']['frozen']) or '-'}/"
                                                 f"{','.join(r['weight_dtypes']['trainable'])}"})
        for name, r in self.result["parts"].get("inference", {}).get("experiments", {}).items():
            if "p50_ms" in r:
                rows.append({"part": "inference", "exp": name, "tokens": r["tokens"], "p50_ms": r["p50_ms"],
                             "p99_ms": r["p99_ms"], "model_p50_ms": r["model_only"]["p50_ms"]})
        text = markdown_table(rows, ["part", "exp", "tokens", "step_ms", "peak_GiB", "MFU_%", "p50_ms", "p99_ms",
                                     "model_p50_ms", "attn", "frozen/trainable"])
        lat = self.result["parts"].get("latents", {}).get("rows", [])
        if lat:
            text += "\n\n" + markdown_table(lat, ["source", "encoder", "dtype", "batch", "frames_per_s"])
        marks = [f"{t['name']} {t['value']:.3g} {t['op']} {t['limit']}: {'pass' if t['pass'] else 'FAIL'}"
                 for t in self.result["targets"]]
        applies = "" if self.result["targets_apply"] else " (not an H100/H200 full run: for information only)"
        return text + f"\n\ntargets{applies}:\n  " + "\n  ".join(marks or ["none measured"])


def one_line(err: BaseException) -> str:
    """`Type: first non-empty line of the message` (at most 300 characters)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {(lines or [''])[0][:300]}"


def finite(value):
    """`value` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def fits_together(run: Run, n: int) -> bool:
    """Whether n runs like this one fit in the GPU's memory at once: each holds its weights and two AdamW moments
    of its trainable weights; the one step running adds its gradients, autocast's bf16 copies of the weights (half
    their fp32 bytes) and an 8 GiB allowance for activations and CoC logits."""
    weights = sum(p.numel() * p.element_size() for p in run.policy.parameters())
    trainable = sum(p.numel() * p.element_size() for p in run.policy.parameters() if p.requires_grad)
    need = n * (weights + 2 * trainable) + trainable + weights / 2 + 8 * 2**30
    return need < 0.9 * torch.cuda.mem_get_info()[1]


def default_out(smoke: bool) -> Path:
    """benchmarks/results/gpu_suite-<device name>[-smoke].json, e.g. gpu_suite-nvidia-h200.json."""
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return RESULTS / f"gpu_suite-{slug}{'-smoke' if smoke else ''}.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device (< 2 minutes on a CPU)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="overall time budget in seconds")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak for MFU (default: from the GPU's name; unknown: no MFU)")
    parser.add_argument("--profile", default=None, help="profile of the policies (default: h100; smoke: demo)")
    parser.add_argument("--backbone", default=None,
                        help="backbone built once and saved (default: random-qwen3-vl-2b; smoke: tiny)")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default: 8; smoke: 2)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: " + str(default_out(False)) + ")")
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    sizes = replace(sizes, **{k: v for k, v in (("profile", args.profile), ("backbone", args.backbone),
                                                ("batch", args.batch)) if v is not None})
    if not args.smoke and not torch.cuda.is_available():
        parser.error("the full suite needs a CUDA GPU; use --smoke to rehearse it on the CPU")
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (peak_flops(torch.cuda.get_device_name(0))
                                                             if torch.cuda.is_available() else None)
    signal.signal(signal.SIGTERM, _on_term)
    hf_logging.disable_progress_bar()
    suite = Suite(sizes, args.smoke, args.budget_s, args.out or default_out(args.smoke), peak)
    print(f"gpu suite ({suite.result['mode']}) on {suite.result['environment']['device']}, budget "
          f"{args.budget_s:.0f} s, writing {suite.out}", flush=True)
    try:
        suite.write()
        suite.part("train_lora", lambda deadline: suite.train("lora", deadline))
        suite.part("inference", suite.inference)
        suite.part("train_full", lambda deadline: suite.train("full", deadline))
        suite.part("latents", suite.latents)
    except HardStop:
        suite.write()
        print(f"stopped by the hard time limit; partial results in {suite.out}")
        return 2
    finally:
        suite.close()
    print("\n" + suite.table())
    print(f"\n{suite.result['wall_s']:.0f} s in all; wrote {suite.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
