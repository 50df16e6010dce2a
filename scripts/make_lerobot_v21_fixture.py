"""Write a small LeRobot v2.1 fixture with the lerobot library itself (0.3.3), and what lerobot reads back from it.

Run with the python of the venv built by scripts/lerobot_v21_env.sh, from the repository root:

    bash scripts/lerobot_v21_env.sh /tmp/lerobot-v21-venv
    /tmp/lerobot-v21-venv/bin/python scripts/make_lerobot_v21_fixture.py          # -> tests/fixtures/lerobot_v21_av1/
    /tmp/lerobot-v21-venv/bin/python scripts/make_lerobot_v21_fixture.py /tmp/out

Versions the committed fixture was made with (Python 3.11.7): lerobot 0.3.3 (codebase_version "v2.1"),
torch 2.13.0+cpu, torchcodec 0.13.0 (lerobot's default video decoder, over the system FFmpeg 5.1 libraries),
av 15.1.0 (lerobot's video encoder: libsvtav1, g=2, crf=30, yuv420p), datasets 3.6.0, pyarrow 26.0.1,
numpy 2.4.6, pandas 2.3.3, pillow 13.0.0, huggingface-hub 0.35.3 (the full list: scripts/lerobot_v21_env.sh).

The dataset (recorded through lerobot's API: `LeRobotDataset.create`, `add_frame`, `save_episode`):
    lerobot_v21_av1: fps 15, one AV1 camera `observation.images.image` of 24x40 (height x width),
                     `observation.state` (4) and `action` (3) float32 drawn from a seeded normal distribution
                     (so that a value that is not copied bit for bit shows), 3 episodes of 7, 11 and 5 frames;
                     episodes 0 and 2 share a task.
Frames are smooth patterns that move with the frame index (red: a horizontal ramp shifted by the frame index,
green: the episode index * 60, blue: a vertical ramp), so that a wrong frame or episode is visible.

Next to the dataset, `expected.json` and `expected_frames.npz` hold what lerobot's own `LeRobotDataset` (0.3.3)
returns for every frame (`ds[i]`): the tabular values, the task string, the decoded frame as uint8 (H, W, 3)
(lerobot gives float32 in [0, 1]; x * 255 rounds back to the uint8 it came from) and its sha256, and
`ds.meta.stats` (lerobot's aggregate of the per-episode statistics). tests/data/test_lerobot_v21.py compares
fplus with these.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
NAME = "lerobot_v21_av1"
FPS = 15
CAMERA = "observation.images.image"
HEIGHT, WIDTH = 24, 40
STATE_DIM, ACTION_DIM = 4, 3
EPISODES = [(7, "put the red block in the bowl"), (11, "open the drawer"), (5, "put the red block in the bowl")]


def pattern(frame_index: int, episode_index: int) -> np.ndarray:
    """(HEIGHT, WIDTH, 3) uint8: red ramp along x shifted by the frame index, green per episode, blue ramp along y."""
    x = np.arange(WIDTH)[None, :]
    y = np.arange(HEIGHT)[:, None]
    img = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    img[..., 0] = (x * 6 + frame_index * 12) % 256
    img[..., 1] = (episode_index * 60) % 256
    img[..., 2] = 40 + y * 8
    return img


def features() -> dict:
    return {
        CAMERA: {"dtype": "video", "shape": (HEIGHT, WIDTH, 3), "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": (STATE_DIM,), "names": [f"s{i}" for i in range(4)]},
        "action": {"dtype": "float32", "shape": (ACTION_DIM,), "names": ["x", "y", "gripper"]},
    }


def write(out: Path) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    if out.exists():
        shutil.rmtree(out)
    rng = np.random.default_rng(21)
    ds = LeRobotDataset.create(repo_id=f"fplus/{NAME}", fps=FPS, features=features(), root=out,
                               robot_type="toy_arm", use_videos=True)  # vcodec: the default, libsvtav1
    for episode_index, (length, task) in enumerate(EPISODES):
        for f in range(length):
            ds.add_frame({
                CAMERA: pattern(f, episode_index),
                "observation.state": rng.normal(size=STATE_DIM).astype(np.float32),
                "action": rng.normal(size=ACTION_DIM).astype(np.float32),
            }, task=task)
        ds.save_episode()
    shutil.rmtree(out / "images", ignore_errors=True)  # lerobot's temporary PNGs


def reference(out: Path) -> tuple[dict, np.ndarray]:
    """What lerobot's LeRobotDataset reads from `out`: a JSON-able dict and the frames (N, H, W, 3) uint8."""
    import lerobot
    import torch
    import torchcodec
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset(repo_id=f"fplus/{NAME}", root=out)
    assert ds.video_backend == "torchcodec", ds.video_backend
    frames = []
    rows = {k: [] for k in ("index", "episode_index", "frame_index", "timestamp", "task_index", "task",
                            "observation.state", "action", "frame_sha256")}
    for i in range(len(ds)):
        item = ds[i]
        img = item[CAMERA]  # (3, H, W) float32 in [0, 1]
        u8 = torch.round(img * 255).to(torch.uint8).permute(1, 2, 0).numpy()
        assert np.array_equal(u8.astype(np.float32) / 255, img.permute(1, 2, 0).numpy()), "not a uint8 frame"
        frames.append(u8)
        for key in ("index", "episode_index", "frame_index", "task_index"):
            rows[key].append(int(item[key]))
        rows["timestamp"].append(float(item["timestamp"]))  # float32 -> float: exact, and JSON round-trips it
        rows["task"].append(item["task"])
        rows["observation.state"].append([float(v) for v in item["observation.state"]])
        rows["action"].append([float(v) for v in item["action"]])
        rows["frame_sha256"].append(hashlib.sha256(np.ascontiguousarray(u8).tobytes()).hexdigest())
    stats = {key: {name: np.asarray(v).tolist() for name, v in s.items()} for key, s in sorted(ds.meta.stats.items())}
    versions = {"lerobot": lerobot.__version__, "torch": torch.__version__, "torchcodec": torchcodec.__version__,
                "codebase_version": ds.meta.info["codebase_version"], "video_backend": ds.video_backend}
    return {"versions": versions, "num_frames": len(ds), "num_episodes": ds.num_episodes, "fps": ds.fps,
            "camera": CAMERA, "frames": rows, "stats": stats}, np.stack(frames)


def readme(out: Path, expected: dict) -> str:
    info = json.loads((out / "meta" / "info.json").read_text())
    video = info["features"][CAMERA]["info"]
    v = expected["versions"]
    lines = [f"# {NAME}", "",
             f"A LeRobot {info['codebase_version']} dataset written by the lerobot library ({v['lerobot']}) itself "
             "through its recording API",
             "(`LeRobotDataset.create`, `add_frame`, `save_episode`), by `scripts/make_lerobot_v21_fixture.py` run in "
             "the venv of `scripts/lerobot_v21_env.sh`.", "",
             f"- fps {FPS}, robot_type `{info['robot_type']}`, {info['total_episodes']} episodes, "
             f"{info['total_frames']} frames, {info['total_tasks']} tasks; one parquet file and one MP4 per episode",
             f"- `{CAMERA}`: {HEIGHT}x{WIDTH} (height x width), codec `{video['video.codec']}` "
             f"({video['video.pix_fmt']})",
             f"- `observation.state` ({STATE_DIM}) and `action` ({ACTION_DIM}): float32 from a seeded normal "
             "distribution",
             "- episodes (length, task):"]
    lines += [f"  - {i}: {length} frames, \"{task}\"" for i, (length, task) in enumerate(EPISODES)]
    lines += ["",
              "Frames: red = (6 x + 12 frame_index) % 256, green = 60 episode_index, blue = 40 + 8 y.",
              f"`expected.json` and `expected_frames.npz`: what lerobot {v['lerobot']}'s `LeRobotDataset` returns for "
              f"every frame (video decoded with {v['video_backend']} {v['torchcodec']}), and its `meta.stats`.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, help=f"output dir (default tests/fixtures/{NAME})")
    args = parser.parse_args()
    out = (args.out or REPO / "tests" / "fixtures" / NAME).resolve()
    write(out)
    expected, frames = reference(out)
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    np.savez_compressed(out / "expected_frames.npz", frames=frames)
    (out / "README.md").write_text(readme(out, expected))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 1024:.0f} KiB): {expected['num_episodes']} episodes, {expected['num_frames']} "
          f"frames, read back with {expected['versions']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
