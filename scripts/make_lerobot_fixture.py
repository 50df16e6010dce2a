"""Write small LeRobot v3.0 fixtures with the lerobot library itself (0.4.4), to check fplus against the reference.

Run with the lerobot venv's python (see scripts/lerobot_compat_env.sh), from the repository root:

    /opt/lerobot-venv/bin/python scripts/make_lerobot_fixture.py            # both fixtures into tests/fixtures/
    /opt/lerobot-venv/bin/python scripts/make_lerobot_fixture.py av1_multicam /tmp/out

Fixtures (the values are documented in each fixture's README.md, written here too):
    av1_multicam: two cameras of different non-square sizes, AV1 (lerobot's default libsvtav1), fps 15,
                  state (6), action (5), 4 episodes of 9, 17, 5 and 13 frames; episodes 0 and 2 share a task.
    images:       `image` features (PNG bytes embedded in the data parquet, use_videos=False), fps 10,
                  state (3), action (2), 2 episodes of 6 and 4 frames.

Every frame is a solid colour: red = (frame_index * 8) % 256, green = (episode_index * 60) % 256, blue = a constant
per camera. observation.state[0] = episode_index, observation.state[1] = frame_index, the rest 0;
action[i] = frame_index + i / 10.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def solid(h: int, w: int, frame_index: int, episode_index: int, blue: int) -> np.ndarray:
    """(h, w, 3) uint8 frame of one colour encoding (frame_index, episode_index)."""
    colour = np.array([(frame_index * 8) % 256, (episode_index * 60) % 256, blue], dtype=np.uint8)
    return np.broadcast_to(colour, (h, w, 3)).copy()


SPECS = {
    "av1_multicam": {
        "dir": "lerobot_v30_av1_multicam",
        "fps": 15,
        "robot_type": "so100_like",
        "use_videos": True,
        # key -> (height, width, blue)
        "cameras": {"observation.images.top": (48, 80, 160), "observation.images.side": (32, 32, 40)},
        "state_dim": 6,
        "action_dim": 5,
        "episodes": [
            (9, "stack the blue block on the green block"),
            (17, "close the microwave door"),
            (5, "stack the blue block on the green block"),
            (13, "slide the mug to the left"),
        ],
    },
    "images": {
        "dir": "lerobot_v30_images",
        "fps": 10,
        "robot_type": "toy",
        "use_videos": False,
        "cameras": {"observation.image": (24, 40, 200)},
        "state_dim": 3,
        "action_dim": 2,
        "episodes": [(6, "push the cube"), (4, "lift the cube")],
    },
}


def features_of(spec: dict) -> dict:
    """lerobot compares frame shapes with `shape` as tuples, so shapes are tuples here (info.json gets lists)."""
    dtype = "video" if spec["use_videos"] else "image"
    features = {
        key: {"dtype": dtype, "shape": (h, w, 3), "names": ["height", "width", "channels"]}
        for key, (h, w, _) in spec["cameras"].items()
    }
    features["observation.state"] = {
        "dtype": "float32", "shape": (spec["state_dim"],), "names": [f"s{i}" for i in range(spec["state_dim"])]
    }
    features["action"] = {
        "dtype": "float32", "shape": (spec["action_dim"],), "names": [f"a{i}" for i in range(spec["action_dim"])]
    }
    return features


def write(name: str, out: Path) -> Path:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    spec = SPECS[name]
    if out.exists():
        shutil.rmtree(out)
    ds = LeRobotDataset.create(
        repo_id=f"fplus/{spec['dir']}", fps=spec["fps"], features=features_of(spec), root=out,
        robot_type=spec["robot_type"], use_videos=spec["use_videos"],  # vcodec: the default, libsvtav1
    )
    for episode_index, (length, task) in enumerate(spec["episodes"]):
        for f in range(length):
            state = np.zeros(spec["state_dim"], dtype=np.float32)
            state[0], state[1] = episode_index, f
            frame = {
                "observation.state": state,
                "action": (f + np.arange(spec["action_dim"]) / 10).astype(np.float32),
                "task": task,
            }
            for key, (h, w, blue) in spec["cameras"].items():
                frame[key] = solid(h, w, f, episode_index, blue)
            ds.add_frame(frame)
        ds.save_episode()
    ds.finalize()
    shutil.rmtree(out / "images", ignore_errors=True)  # lerobot's temporary PNGs, if any are left
    (out / "README.md").write_text(readme(name, spec, out, verify(spec, out)))
    return out


def verify(spec: dict, out: Path) -> dict[str, float]:
    """Read the fixture back with lerobot; check the tabular values exactly, return each camera's max colour error."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset(repo_id=f"fplus/{spec['dir']}", root=out)
    lengths = [length for length, _ in spec["episodes"]]
    assert ds.num_frames == sum(lengths) and ds.num_episodes == len(lengths), (ds.num_frames, ds.num_episodes)
    worst = dict.fromkeys(spec["cameras"], 0.0)
    for i in range(len(ds)):
        item = ds[i]
        ep, f = int(item["episode_index"]), int(item["frame_index"])
        assert item["task"] == spec["episodes"][ep][1], (i, item["task"])
        assert item["observation.state"][:2].tolist() == [ep, f], (i, item["observation.state"])
        want = f + np.arange(spec["action_dim"]) / 10
        assert np.allclose(item["action"].numpy(), want, atol=1e-6), (i, item["action"])
        for key, (h, w, blue) in spec["cameras"].items():
            img = item[key].numpy() * 255  # (3, H, W)
            assert img.shape == (3, h, w), (key, img.shape)
            expected = np.array([(f * 8) % 256, (ep * 60) % 256, blue], dtype=np.float64)[:, None, None]
            worst[key] = max(worst[key], float(np.abs(img - expected).max()))
    return worst


def readme(name: str, spec: dict, out: Path, worst: dict[str, float]) -> str:
    info = json.loads((out / "meta" / "info.json").read_text())
    lines = [f"# {spec['dir']}", "",
             "A LeRobot v3.0 dataset written by the lerobot library (0.4.4) itself through its recording API",
             "(`LeRobotDataset.create`, `add_frame`, `save_episode`, `finalize`), by",
             f"`scripts/make_lerobot_fixture.py {name}` run in the venv of `scripts/lerobot_compat_env.sh`.", "",
             f"- fps {spec['fps']}, robot_type `{spec['robot_type']}`, {info['total_episodes']} episodes, "
             f"{info['total_frames']} frames, {info['total_tasks']} tasks"]
    for key, (h, w, blue) in spec["cameras"].items():
        ft = info["features"][key]
        where = (f"video, codec `{ft['info']['video.codec']}` ({ft['info']['video.pix_fmt']})"
                 if ft["dtype"] == "video" else "`image` feature: PNG bytes embedded in the data parquet")
        lines.append(f"- `{key}`: {h}x{w} (height x width), {where}; blue = {blue}")
    lines += [f"- `observation.state` ({spec['state_dim']}), `action` ({spec['action_dim']}), `task`",
              "- episodes (length, task):"]
    for i, (length, task) in enumerate(spec["episodes"]):
        lines.append(f"  - {i}: {length} frames, \"{task}\"")
    lines += ["",
              "Every frame is a solid colour: red = (frame_index * 8) % 256, green = (episode_index * 60) % 256, "
              "blue = the camera's constant above.",
              "`observation.state[0]` is the episode index, `observation.state[1]` the frame index, the other "
              "entries 0; `action[i] = frame_index + i / 10`.",
              "Tabular columns are exact. Decoded by lerobot (torchcodec), the largest per-pixel colour error is "
              + ", ".join(f"{v:.0f} levels in `{k}`" for k, v in worst.items())
              + " (lossy coding, yuv420p)." if spec["use_videos"] else
              "Tabular columns and the images are exact (PNG is lossless); largest per-pixel error read back by "
              "lerobot: " + ", ".join(f"{v:.0f}" for v in worst.values()) + ".", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="?", choices=[*SPECS, "all"], default="all")
    parser.add_argument("out", nargs="?", type=Path,
                        help="output dir (only with one fixture; default tests/fixtures/<name>)")
    args = parser.parse_args()
    names = list(SPECS) if args.which == "all" else [args.which]
    if args.out is not None and len(names) > 1:
        parser.error("give an output dir only together with one fixture name")
    for name in names:
        out = args.out or REPO / "tests" / "fixtures" / SPECS[name]["dir"]
        write(name, out.resolve())
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        print(f"{name}: wrote {out} ({size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
