"""Frames/s of world-latent precompute, per source.

CPU: the tiny encoders end to end (video decode + causal clips + encode + fp16 cache) on a synthetic dataset,
and the encoder alone. GPU (when available): the full-size architectures with random weights (DINOv2-base,
DINOv3-ViT-B/16, V-JEPA 2 ViT-L at 256 px, 8-frame clips), encoder alone, fp32 and bf16 autocast.

    python benchmarks/latents.py [--frames 600] [--full-size-cpu]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, markdown_table, timed, write_results  # noqa: E402

from fplus.world.encoders import build_encoder  # noqa: E402

if TYPE_CHECKING:
    from fplus.data.lerobot import LeRobotDataset

KEY = "observation.images.image"


def synthetic_dataset(root: Path, frames: int, size: int = 96, episode_len: int = 50) -> LeRobotDataset:
    from fplus.data.lerobot import LeRobotDataset  # the data layer (pyarrow, av) only for the end-to-end rows
    from fplus.data.writer import LeRobotWriter

    rng = np.random.default_rng(0)
    w = LeRobotWriter(root, fps=10, features={
        KEY: {"dtype": "video", "shape": [size, size, 3], "names": ["height", "width", "channels"]},
        "action": {"dtype": "float32", "shape": [4], "names": ["a", "b", "c", "d"]}})
    left = frames
    while left > 0:
        n = min(episode_len, left)
        base = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
        moving = np.clip(base.astype(int) + np.arange(n)[:, None, None, None], 0, 255).astype(np.uint8)
        w.add_episode("benchmark task", {KEY: moving, "action": np.zeros((n, 4), np.float32)})
        left -= n
    return LeRobotDataset.open(w.finalize())


def encoder_only(source: str, model_id: str, batch: int, device: str, dtype: str, repeats: int) -> dict:
    """Frames/s of the encoder alone on random 256 px clips (frames of one batch), fp32 or bf16 autocast (CUDA)."""
    enc = build_encoder(source, dino_model=model_id, vjepa_model=model_id, pooling="cls", temporal_window=8,
                        device=device)
    m = enc.temporal_window
    clips = torch.randint(0, 256, (batch, m, 256, 256, 3), dtype=torch.uint8)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if dtype == "bf16" else torch.autocast("cpu", enabled=False)

    def run():
        with ctx:
            enc.encode_frames(clips)

    times = timed(run, repeats=repeats)
    return {"source": source, "encoder": model_id, "device": device, "dtype": dtype, "batch": batch,
            "clip_frames": m, "frames_per_s": batch / float(np.median(times)), "mode": "encoder only, 256 px input"}


def end_to_end(source: str, frames: int, batch: int) -> dict:
    from fplus.world.cache import compute_latents

    with tempfile.TemporaryDirectory() as tmp:
        ds = synthetic_dataset(Path(tmp) / "ds", frames)
        enc = build_encoder(source, dino_model="tiny", vjepa_model="tiny", pooling="cls", temporal_window=8)
        t0 = time.perf_counter()
        result = compute_latents(ds, KEY, enc, Path(tmp) / "cache", batch, progress=False)
        seconds = time.perf_counter() - t0
    return {"source": source, "encoder": "tiny", "device": "cpu", "dtype": "fp32", "batch": batch,
            "clip_frames": enc.temporal_window, "frames_per_s": result.frames_computed / seconds,
            "mode": f"end to end, {frames} frames at 96 px"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=600, help="frames of the synthetic dataset (CPU end to end)")
    parser.add_argument("--full-size-cpu", action="store_true", help="also time full-size encoders on the CPU")
    args = parser.parse_args()

    rows = [end_to_end(s, args.frames, 32) for s in ("dino", "vjepa")]
    rows += [encoder_only(s, "tiny", 32, "cpu", "fp32", 5) for s in ("dino", "vjepa")]
    full = {"dino": ["random-dinov2-base", "random-dinov3-vitb16"], "vjepa": ["random-vjepa2-vitl"]}
    if args.full_size_cpu:
        rows += [encoder_only(s, m, 4, "cpu", "fp32", 2) for s, ids in full.items() for m in ids]
    if torch.cuda.is_available():
        for dtype in ("fp32", "bf16"):
            rows += [encoder_only(s, m, 64 if s == "dino" else 8, "cuda", dtype, 10)
                     for s, ids in full.items() for m in ids]
    columns = ["source", "encoder", "device", "dtype", "batch", "clip_frames", "frames_per_s", "mode"]
    print(f"world-latent precompute on {environment()['device']}\n")
    print(markdown_table(rows, columns))
    print(f"\nwrote {write_results('latents', rows)}")


if __name__ == "__main__":
    main()
