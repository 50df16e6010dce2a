"""Frames/s of the training data pipeline, measured side by side (interleaved rounds, medians):

- pipeline: decode + windows + latents + collate (`Collate()`: no prompt), frames preloaded in RAM or decoded one
  by one on demand, with DataLoader workers 0 and 2; prompt building (tokenise + image processing) at 96 and 224 px;
- lerobot: fplus's on-demand decoding against lerobot's LeRobotDataset (torchcodec) on the same AV1 datasets
  (re-encoded with lerobot's defaults: libsvtav1, g=2, crf=30; 128 and 256 px), in shuffled (training) and index
  (validation) order, workers 0 and 2, and the ratio; needs the lerobot reference venv
  (scripts/lerobot_compat_env.sh) at $FPLUS_LEROBOT_VENV or /opt/lerobot-venv, else only fplus is measured;
- threads: the training batch's collate (augmentation + prompt building) and the decoding in the training process
  (NUM_WORKERS=0) on torch's default thread pool, against one thread (what `Collate` runs on);
- workers: 50 training steps of the demo E0 (profile demo, outputs/demo/data or a synthetic copy of its shape) with
  NUM_WORKERS=0, 1 and 2, torch's default thread pool and one thread in the training process: the steps/s after
  the first 10.

    python benchmarks/data.py [--sections pipeline,lerobot,threads,workers] [--size 128] [--rounds 3]
    FPLUS_LEROBOT_VENV=/tmp/lerobot-venv python benchmarks/data.py --sections lerobot --lerobot-sizes 256
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, markdown_table, write_results  # noqa: E402

from fplus import batch as K  # noqa: E402
from fplus.data.lerobot import DataKeys, LeRobotDataset  # noqa: E402
from fplus.data.writer import LeRobotWriter  # noqa: E402
from fplus.train.data import Collate, EpochSampler, PolicySamples, collate  # noqa: E402

CAM = "observation.images.image"
KEYS = DataKeys(image=CAM, state="observation.state", action="action", instruction="task")
REPO = Path(__file__).resolve().parent.parent

# Run by the lerobot venv's python: frames/s of lerobot's LeRobotDataset through a DataLoader in a given order.
LEROBOT_RATE = """
import json, sys, time
import numpy as np
from torch.utils.data import DataLoader
from lerobot.datasets.lerobot_dataset import LeRobotDataset
root, order, workers, batch, batches = sys.argv[1], np.load(sys.argv[2]).tolist(), *map(int, sys.argv[3:6])
ds = LeRobotDataset("local/bench", root=root)
it = iter(DataLoader(ds, batch_size=batch, num_workers=workers, sampler=order))
for _ in range(2):
    next(it)
t0 = time.perf_counter()
for _ in range(batches):
    next(it)
print(json.dumps({"frames_per_s": batches * batch / (time.perf_counter() - t0)}))
"""


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


def to_av1(root: Path) -> LeRobotDataset:
    """Re-encode every video of a dataset as lerobot records them (libsvtav1, g=2, crf=30, yuv420p), in place."""
    import av

    info = json.loads((root / "meta/info.json").read_text())
    for mp4 in sorted(root.glob("videos/**/*.mp4")):
        with av.open(str(mp4)) as src:
            frames = [f.to_ndarray(format="rgb24") for f in src.decode(video=0)]
        tmp = mp4.with_suffix(".av1.mp4")
        with av.open(str(tmp), "w") as out:
            stream = out.add_stream("libsvtav1", rate=info["fps"], options={"g": "2", "crf": "30"})
            stream.height, stream.width = frames[0].shape[:2]
            stream.pix_fmt, stream.time_base = "yuv420p", Fraction(1, info["fps"])
            for i, frame in enumerate(frames):
                vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
                vf.pts, vf.time_base = i, Fraction(1, info["fps"])
                out.mux(stream.encode(vf))
            out.mux(stream.encode())
        tmp.replace(mp4)
    for feature in info["features"].values():
        if feature["dtype"] == "video":
            feature["info"]["video.codec"] = "av1"
    (root / "meta/info.json").write_text(json.dumps(info, indent=4))
    return LeRobotDataset.open(root)


def rate(loader, max_batches: int, warmup: int = 0) -> float:
    """Frames/s over `max_batches` batches, after `warmup` batches (worker start-up) left out."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t0, n = time.perf_counter(), 0
    for _, batch in zip(range(max_batches), it, strict=False):
        n += len(batch["index"])
    return n / (time.perf_counter() - t0)


def pipeline(args, ds: LeRobotDataset, latents: np.ndarray) -> list[dict]:
    rows = []
    episodes = [e.index for e in ds.episodes]
    for preload in (True, False):
        t0 = time.perf_counter()
        samples = PolicySamples(ds, KEYS, episodes, horizon=8, history=4, future=4, latents=latents, preload=preload)
        setup = time.perf_counter() - t0
        for workers in (0, 2):
            loader = DataLoader(samples, batch_size=args.batch, collate_fn=Collate(), num_workers=workers,
                                sampler=EpochSampler(len(samples), seed=0))
            rows.append({"section": "pipeline", "stage": "decode+windows+latents+collate",
                         "frames": "preloaded" if preload else "decoded one by one", "workers": workers,
                         "frames_per_s": rate(loader, args.batches), "setup_s": setup})
    from fplus.model.backbone import load_backbone
    from fplus.model.prompt import PromptBuilder

    backbone = load_backbone("tiny", action_horizon=8, num_fut_tokens=4, use_state=True)
    batches = [b for _, b in zip(range(20), DataLoader(PolicySamples(ds, KEYS, episodes, 8, 4, 4, latents=latents),
                                                       batch_size=args.batch, collate_fn=collate), strict=False)]
    for image_size in (96, 224):
        builder = PromptBuilder(backbone, image_size, 4, use_state=True, coc_mode=None)
        t0 = time.perf_counter()
        for b in batches:
            builder(b[K.IMAGES], b[K.INSTRUCTIONS])
        rows.append({"section": "pipeline", "stage": f"prompt building at {image_size} px", "frames": "-",
                     "workers": 0, "frames_per_s": sum(len(b["index"]) for b in batches) / (time.perf_counter() - t0)})
    return rows


def lerobot_venv() -> Path | None:
    venv = Path(os.environ.get("FPLUS_LEROBOT_VENV", "/opt/lerobot-venv"))
    return venv if (venv / "bin/python").exists() else None


def against_lerobot(args, ds: LeRobotDataset, tmp: Path) -> list[dict]:
    """fplus on demand vs lerobot on the same AV1 dataset, the same orders, batch size and worker counts; lerobot
    also with OMP_NUM_THREADS=1 in its training process (workers 0: its per-frame tensor work runs there)."""
    venv = lerobot_venv()
    samples = PolicySamples(ds, KEYS, [e.index for e in ds.episodes], horizon=8, history=4, future=4, preload=False)
    orders = {"shuffled": np.asarray(list(EpochSampler(len(samples), seed=0))), "index": np.arange(len(samples))}
    variants = {"lerobot": {}, "lerobot, OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"}}
    measured: dict[tuple, list[float]] = {}
    for _ in range(args.rounds):
        for order_name, order in orders.items():
            np.save(tmp / "order.npy", order)
            for workers in (0, 2):
                loader = DataLoader(samples, batch_size=args.batch, collate_fn=Collate(), num_workers=workers,
                                    sampler=order.tolist())
                measured.setdefault(("fplus", order_name, workers), []).append(rate(loader, args.batches, warmup=2))
                for name, env in variants.items() if venv else ():
                    if env and workers:
                        continue
                    command = [str(venv / "bin/python"), "-c", LEROBOT_RATE, str(ds.root), str(tmp / "order.npy"),
                               str(workers), str(args.batch), str(args.batches)]
                    out = subprocess.run(command, capture_output=True, text=True, timeout=600,
                                         env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
                    if out.returncode:
                        raise SystemExit(f"lerobot's loader failed:\n{out.stderr[-2000:]}")
                    measured.setdefault((name, order_name, workers), []).append(
                        json.loads(out.stdout.strip().splitlines()[-1])["frames_per_s"])
    size = ds.features[CAM]["shape"][0]
    rows = [{"section": "lerobot", "stage": f"{who}: on-demand AV1 {size} px", "frames": order, "workers": workers,
             "frames_per_s": statistics.median(v), "rounds": len(v), "per_round": v}
            for (who, order, workers), v in measured.items()]
    for (who, order, workers), v in measured.items():
        if who != "fplus":
            rows.append({"section": "lerobot", "stage": f"ratio fplus / {who} {size} px", "frames": order,
                         "workers": workers,
                         "ratio": statistics.median(measured[("fplus", order, workers)]) / statistics.median(v)})
    return rows


def threads(args, ds: LeRobotDataset) -> list[dict]:
    """Collate (augmentation + prompt building) and decoding in the training process: torch's default pool vs 1."""
    from fplus.model.augment import ImageAugment
    from fplus.model.backbone import load_backbone
    from fplus.model.processor import PolicyProcessor
    from fplus.settings import load_settings
    from fplus.train.data import FrameStore

    default = torch.get_num_threads()
    backbone = load_backbone("tiny", action_horizon=8, num_fut_tokens=4, use_state=True)
    processor = PolicyProcessor.for_backbone(backbone, 96, 4, use_state=True, coc_mode=None)
    augment = ImageAugment.from_settings(load_settings(None, {"AUGMENT": "default"}, environ={}, dotenv=None).data, 0)
    episodes = [e.index for e in ds.episodes]
    preloaded = PolicySamples(ds, KEYS, episodes, 8, 4, 4, preload=True)
    batches = [[preloaded[i] for i in range(j, j + args.batch)] for j in range(0, 20 * args.batch, args.batch)]
    guarded = Collate(processor, augment=augment)

    def pool_collate(samples):  # Collate's work without its one-thread guard (the training process's pool)
        batch = collate(samples)
        batch[K.IMAGES] = augment(batch[K.IMAGES], batch["index"], 0)
        return processor(batch)

    on_demand = FrameStore(ds, CAM, episodes, preload=False)
    rows_of = np.random.default_rng(0).permutation(ds.num_frames)[:300]
    episode_of = ds.episode_of_frames()[rows_of]
    work = {
        "collate: augment + prompt (96 px)": lambda: [pool_collate(b) for b in batches],
        "collate: augment + prompt (96 px), Collate": lambda: [guarded(b) for b in batches],
        "decode on demand (shuffled)": lambda: [on_demand.get(int(e), int(r)) for e, r in zip(episode_of, rows_of,
                                                                                                strict=True)],
        "decode episodes (preload)": lambda: FrameStore(ds, CAM, episodes[:4], preload=True),
    }
    frames = {"decode episodes (preload)": 4 * args.length}
    measured: dict[tuple, list[float]] = {}
    for _ in range(args.rounds):
        for name, fn in work.items():
            for n in (default, 1):
                if n == 1 and name.endswith("Collate"):
                    continue
                torch.set_num_threads(n)
                ds._video_cache.clear()
                t0 = time.perf_counter()
                fn()
                count = frames.get(name, len(batches) * args.batch if name.startswith("collate") else 300)
                measured.setdefault((name, f"torch threads {n}"), []).append(count / (time.perf_counter() - t0))
    torch.set_num_threads(default)
    return [{"section": "threads", "stage": stage, "frames": pool, "workers": 0, "frames_per_s": statistics.median(v),
             "rounds": len(v)} for (stage, pool), v in measured.items()]


def workers_rows(args, tmp: Path) -> list[dict]:
    """Steps/s of the demo E0 (steps 10 to 50) with NUM_WORKERS 0, 1, 2, the training process on torch's default
    thread pool and on one thread, interleaved."""
    from accelerate.state import AcceleratorState, PartialState

    from fplus.rundir import run_dir_for
    from fplus.settings import load_settings
    from fplus.train.recipe import TrainRecipe

    data = REPO / "outputs/demo/data"
    if not (data / "meta/info.json").is_file():
        data = dataset(tmp / "demo", 80, 75, 96).root
    default = torch.get_num_threads()
    measured: dict[tuple, list[float]] = {}
    for r, workers, threads in itertools.product(range(args.rounds), (0, 1, 2), sorted({default, 1}, reverse=True)):
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
        torch.set_num_threads(threads)
        s = load_settings("demo", {"DATASET": str(data), "EXPERIMENT": "E0", "MAX_STEPS": 50, "VAL_BATCHES": 1,
                                   "NUM_WORKERS": workers, "OUTPUT_DIR": str(tmp / f"runs-{r}-{workers}-{threads}")},
                          environ={}, dotenv=None)
        recipe = TrainRecipe(s, run_dir_for(s), progress_bar=False)
        recipe.setup()
        stamps, step = [], recipe.train_step

        def timed_step(pending, step=step, stamps=stamps):
            out = step(pending)
            stamps.append(time.perf_counter())
            return out

        recipe.train_step = timed_step
        recipe.fit()
        measured.setdefault((workers, threads), []).append(40 / (stamps[49] - stamps[9]))
    torch.set_num_threads(default)
    return [{"section": "workers", "stage": f"demo E0 training steps ({data})", "frames": f"torch threads {t}",
             "workers": w, "steps_per_s": statistics.median(v), "rounds": len(v), "per_round": v}
            for (w, t), v in measured.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="pipeline,lerobot,threads,workers")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--length", type=int, default=100)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--lerobot-sizes", default="128,256", help="frame sizes of the AV1 datasets (lerobot)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sections = args.sections.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ds = dataset(tmp / "ds", args.episodes, args.length, args.size)
        if "pipeline" in sections:
            latents = np.random.default_rng(0).normal(size=(ds.num_frames, 768)).astype(np.float16)
            rows += pipeline(args, ds, latents)
        if "threads" in sections:
            rows += threads(args, ds)
        for size in map(int, args.lerobot_sizes.split(",") if "lerobot" in sections else []):
            av1 = to_av1(dataset(tmp / f"av1-{size}", args.episodes, args.length, size).root)
            rows += against_lerobot(args, av1, tmp)
        if "workers" in sections:
            rows += workers_rows(args, tmp)
    consumed = None
    step_file = next(iter(sorted(RESULTS.glob("train_step-*.json"))), None)
    if step_file is not None:
        step_rows = json.loads(step_file.read_text())["rows"]
        e2 = [r for r in step_rows if r.get("exp") == "E2" and isinstance(r.get("samples_per_s"), float)]
        consumed = max(r["samples_per_s"] for r in e2) if e2 else None
    columns = ["section", "stage", "frames", "workers", "frames_per_s", "ratio", "steps_per_s", "rounds", "setup_s"]
    print(f"data pipeline on {environment()['device']} ({args.episodes} x {args.length} frames at {args.size} px, "
          f"batch {args.batch}, medians of {args.rounds} interleaved rounds)\n")
    print(markdown_table(rows, columns))
    if "lerobot" in sections and lerobot_venv() is None:
        print("\nno lerobot venv (FPLUS_LEROBOT_VENV or /opt/lerobot-venv; scripts/lerobot_compat_env.sh): "
              "only fplus was measured")
    decode = [r["frames_per_s"] for r in rows if r["stage"].startswith("decode+")]
    if consumed and decode:
        print(f"\nfastest training step ({step_file.name}, E2) consumes {consumed:.1f} samples/s; "
              f"the loader delivers {max(decode):.1f} ({max(decode) / consumed:.1f}x)")
    print(f"\nwrote {write_results('data', rows, {'train_step_samples_per_s': consumed, 'args': vars(args)})}")


if __name__ == "__main__":
    main()
