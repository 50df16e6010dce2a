"""Check that the lerobot library (0.4.4) reads a local LeRobot v3.0 dataset, e.g. one written by fplus.

Run with the lerobot venv's python (see scripts/lerobot_compat_env.sh):

    /opt/lerobot-venv/bin/python scripts/check_lerobot_reads.py PATH [--all-frames] [--check-pattern]

Loads PATH with `LeRobotDataset(repo_id="local/x", root=PATH)` (offline) and prints a JSON summary to stdout:
num_episodes, num_frames, fps, features, tasks, and for the first and last frame of every episode its
episode_index, frame_index, index, timestamp, task, observation.state, action and the mean RGB (0-255) of every
camera frame. --all-frames also loads every frame once (decoding every video frame lerobot's way).
--check-pattern checks the test pattern of the fixtures (tests/fixtures/*/README.md): state[0] = episode_index,
state[1] = frame_index, action[i] = frame_index + i / 10, red = (frame_index * 8) % 256 and
green = (episode_index * 60) % 256 within --tolerance levels.
Exits 1 with a message on stderr when loading or a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def fail(message: str) -> None:
    print(f"check_lerobot_reads: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def missing_files(root: Path) -> list[str]:
    """Data and video files that meta/episodes refers to but that are not on disk (lerobot then tries the hub)."""
    import pyarrow.parquet as pq

    info = json.loads((root / "meta" / "info.json").read_text())
    wanted = set()
    for path in sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet")):
        for row in pq.read_table(path).to_pylist():
            wanted.add(info["data_path"].format(chunk_index=row["data/chunk_index"], file_index=row["data/file_index"]))
            for key, ft in info["features"].items():
                if ft["dtype"] == "video":
                    wanted.add(info["video_path"].format(video_key=key, chunk_index=row[f"videos/{key}/chunk_index"],
                                                         file_index=row[f"videos/{key}/file_index"]))
    return sorted(p for p in wanted if not (root / p).is_file())


def as_list(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path)
    parser.add_argument("--all-frames", action="store_true", help="load every frame once")
    parser.add_argument("--check-pattern", action="store_true", help="check the fixtures' test pattern")
    parser.add_argument("--tolerance", type=float, default=8.0, help="colour tolerance in levels (0-255)")
    args = parser.parse_args()
    root = args.path.resolve()
    if not (root / "meta" / "info.json").is_file():
        fail(f"{root} has no meta/info.json: not a LeRobot dataset")

    try:
        import lerobot
        from lerobot.datasets.lerobot_dataset import LeRobotDataset
    except Exception as e:  # noqa: BLE001
        fail(f"cannot import lerobot ({type(e).__name__}: {e}); run this with the lerobot venv's python")

    try:
        ds = LeRobotDataset(repo_id="local/x", root=root)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        try:
            missing = missing_files(root)
        except Exception:  # noqa: BLE001
            missing = []
        hint = (f"; lerobot went to the hub because files that meta/episodes refers to are missing: {missing}"
                if missing else "")
        fail(f"LeRobotDataset(root={root}) raised {type(e).__name__}: {e}{hint}")

    meta = ds.meta
    camera_keys = list(meta.camera_keys)
    episodes = meta.episodes  # datasets.Dataset, one row per episode
    summary = {
        "lerobot_version": getattr(lerobot, "__version__", None),
        "path": str(root),
        "codebase_version": meta.info.get("codebase_version"),
        "num_episodes": ds.num_episodes,
        "num_frames": ds.num_frames,
        "fps": ds.fps,
        "video_backend": ds.video_backend,
        "camera_keys": camera_keys,
        "features": {k: {"dtype": v["dtype"], "shape": list(v["shape"]),
                         **({"codec": v["info"].get("video.codec")} if v.get("info") else {})}
                     for k, v in meta.features.items()},
        "tasks": {str(task): int(row) for task, row in meta.tasks["task_index"].items()},
        "episodes": [],
        "frames": [],
    }
    problems: list[str] = []

    def load(i: int) -> dict:
        try:
            return ds[i]
        except Exception as e:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)
            fail(f"ds[{i}] raised {type(e).__name__}: {e}")

    def describe(i: int, item: dict) -> dict:
        out = {"dataset_index": i}
        for key in ("episode_index", "frame_index", "index", "task_index", "timestamp"):
            if key in item:
                out[key] = round(float(item[key]), 6) if key == "timestamp" else int(item[key])
        out["task"] = item.get("task")
        for key in ("observation.state", "action"):
            if key in item:
                out[key] = [round(x, 6) for x in as_list(item[key])]
        for key in camera_keys:
            img = item[key]  # (C, H, W) float in [0, 1]
            out[key] = {"shape": list(img.shape),
                        "mean_rgb": [round(x, 2) for x in (img.float() * 255).mean(dim=(1, 2)).tolist()]}
        return out

    def check_pattern(d: dict) -> None:
        ep, f = d["episode_index"], d["frame_index"]
        where = f"frame {d['dataset_index']} (episode {ep}, frame {f})"
        state, action = d.get("observation.state"), d.get("action")
        if state is not None and (abs(state[0] - ep) > 1e-6 or abs(state[1] - f) > 1e-6):
            problems.append(f"{where}: state[:2] = {state[:2]}, expected [{ep}, {f}]")
        if action is not None:
            want = [f + i / 10 for i in range(len(action))]
            if any(abs(a - b) > 1e-4 for a, b in zip(action, want, strict=True)):
                problems.append(f"{where}: action = {action}, expected {want}")
        for key in camera_keys:
            r, g, _ = d[key]["mean_rgb"]
            if abs(r - (f * 8) % 256) > args.tolerance or abs(g - (ep * 60) % 256) > args.tolerance:
                problems.append(f"{where}: {key} mean RGB {d[key]['mean_rgb']}, expected red {(f * 8) % 256} "
                                f"and green {(ep * 60) % 256}")

    for row in episodes:
        ep = int(row["episode_index"])
        start, stop = int(row["dataset_from_index"]), int(row["dataset_to_index"])
        summary["episodes"].append({"episode_index": ep, "length": int(row["length"]), "tasks": list(row["tasks"]),
                                    "dataset_from_index": start, "dataset_to_index": stop})
        for i in sorted({start, stop - 1}):
            d = describe(i, load(i))
            if d.get("episode_index") != ep:
                problems.append(f"frame {i}: episode_index {d.get('episode_index')}, expected {ep}")
            summary["frames"].append(d)

    if args.all_frames or args.check_pattern:
        for i in range(ds.num_frames):
            d = describe(i, load(i))
            if args.check_pattern:
                check_pattern(d)
        summary["all_frames_loaded"] = ds.num_frames

    summary["problems"] = problems
    print(json.dumps(summary, indent=2))
    if problems:
        fail(f"{len(problems)} problem(s), first: {problems[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
