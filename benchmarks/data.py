"""Samples/s of the training data pipeline: frame decode + windows + latents + collate (DataLoader workers 0
and 2, frames preloaded in RAM or decoded per episode on demand), and of prompt building (tokenise + image
processing), against the rate the training step consumes samples (benchmarks/results/train_step-*.json).

    python benchmarks/data.py [--episodes 20] [--length 100] [--size 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, markdown_table, write_results  # noqa: E402

from fplus import batch as K  # noqa: E402
from fplus.data.lerobot import DataKeys, LeRobotDataset  # noqa: E402
from fplus.data.writer import LeRobotWriter  # noqa: E402
from fplus.train.data import EpochSampler, PolicySamples, collate  # noqa: E402

CAM = "observation.images.image"


def dataset(root: Path, episodes: int, length: int, size: int) -> LeRobotDataset:
    rng = np.random.default_rng(0)
    w = LeRobotWriter(root, fps=10, features={
        CAM: {"dtype": "video", "shape": [size, size, 3], "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": [8], "names": None},
        "action": {"dtype": "float32", "shape": [7], "names": None}})
    for e in range(episodes):
        base = rng.integers(0, 200, (1, size, size, 3))
        frames = np.clip(base + np.arange(length)[:, None, None, None] // 2, 0, 255).astype(np.uint8)
        w.add_episode(f"task {e % 4}", {CAM: frames, "observation.state": rng.normal(size=(length, 8)).astype("f4"),
                                        "action": rng.normal(size=(length, 7)).astype("f4")})
    return LeRobotDataset.open(w.finalize())


def rate(loader, max_batches: int) -> float:
    t0, n = time.perf_counter(), 0
    for i, batch in enumerate(loader):
        n += len(batch["index"])
        if i + 1 >= max_batches:
            break
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--length", type=int, default=100)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=60)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ds = dataset(Path(tmp) / "ds", args.episodes, args.length, args.size)
        keys = DataKeys(image=CAM, state="observation.state", action="action", instruction="task")
        latents = np.random.default_rng(0).normal(size=(ds.num_frames, 768)).astype(np.float16)
        episodes = [e.index for e in ds.episodes]
        for preload in (True, False):
            t0 = time.perf_counter()
            samples = PolicySamples(ds, keys, episodes, horizon=8, history=4, future=4, latents=latents,
                                    preload=preload)
            setup = time.perf_counter() - t0
            for workers in (0, 2):
                loader = DataLoader(samples, batch_size=args.batch, collate_fn=collate, num_workers=workers,
                                    sampler=EpochSampler(len(samples), seed=0))
                rows.append({"stage": "decode+windows+latents+collate",
                             "frames": "preloaded" if preload else "decoded one by one", "workers": workers,
                             "samples_per_s": rate(loader, args.batches), "setup_s": setup})
        from fplus.model.backbone import load_backbone
        from fplus.model.prompt import PromptBuilder

        backbone = load_backbone("tiny", action_horizon=8, num_fut_tokens=4, use_state=True)
        for image_size in (96, 224):
            builder = PromptBuilder(backbone, image_size, 4, use_state=True, coc_mode=None)
            loader = DataLoader(PolicySamples(ds, keys, episodes, 8, 4, 4, latents=latents), batch_size=args.batch,
                                collate_fn=collate, sampler=EpochSampler(ds.num_frames, seed=0))
            batches = [b for _, b in zip(range(20), loader, strict=False)]
            t0 = time.perf_counter()
            for b in batches:
                builder(b[K.IMAGES], b[K.INSTRUCTIONS])
            rows.append({"stage": f"prompt building at {image_size} px", "frames": "-", "workers": 0,
                         "samples_per_s": sum(len(b["index"]) for b in batches) / (time.perf_counter() - t0)})
    consumed = None
    step_file = next(iter(sorted(RESULTS.glob("train_step-*.json"))), None)
    if step_file is not None:
        step_rows = json.loads(step_file.read_text())["rows"]
        e2 = [r for r in step_rows if r.get("exp") == "E2" and isinstance(r.get("samples_per_s"), float)]
        consumed = max(r["samples_per_s"] for r in e2) if e2 else None
    columns = ["stage", "frames", "workers", "samples_per_s", "setup_s"]
    print(f"data pipeline on {environment()['device']} ({args.episodes} x {args.length} frames at {args.size} px)\n")
    print(markdown_table(rows, columns))
    if consumed:
        best = max(r["samples_per_s"] for r in rows if r["stage"].startswith("decode"))
        print(f"\nfastest training step ({step_file.name}, E2) consumes {consumed:.1f} samples/s; "
              f"the loader delivers {best:.1f} ({best / consumed:.1f}x)")
    print(f"\nwrote {write_results('data', rows, {'train_step_samples_per_s': consumed})}")


if __name__ == "__main__":
    main()
