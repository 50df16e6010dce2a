"""Check a local LeRobot v3.0 dataset with two third-party tools from PyPI: lerobot-doctor and lerobot-dataset.

Run with the outside-checkers venv's python (see scripts/outside_checkers_env.sh):

    .outside-venv/bin/python scripts/check_outside_readers.py PATH --npz OUT.npz [--json OUT.json]

1. lerobot-doctor 0.2.0 (its Python API: `load_dataset` + `run_checks`, every check): the JSON gets
   `doctor.summary` ({"PASS": n, "WARN": n, "FAIL": n} over checks), `doctor.overall`, and `doctor.checks`, one
   {"name", "severity", "messages": [[severity, text], ...]} per check.
2. lerobot-dataset 0.4.4 (`ledataset.datasets.lerobot_dataset.LeRobotDataset`, offline, video through torchcodec):
   reads every frame `ds[i]`, i = 0..N-1, and writes to the .npz, stacked over i: every tabular feature as read
   (index, episode_index, frame_index, task_index, timestamp: (N,); vectors: (N, D)) and every camera as (N, H, W, 3)
   uint8. The reader returns camera frames as (3, H, W) float32 = uint8 / 255; they are turned back into uint8 with
   round(x * 255), and the script fails unless x * 255 is within 1e-3 of an integer everywhere (so the uint8 frames
   are exactly what the decoder produced). The JSON gets `reader` (versions, num_episodes, num_frames, fps, backend,
   cameras, the task string of every frame, and the sha256 of every uint8 frame per camera).
Exits 1 with a message on stderr when a tool cannot load the dataset or a frame; a doctor FAIL is only reported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import traceback
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROUNDING_TOLERANCE = 1e-3  # |x * 255 - round(x * 255)| allowed for a float frame x = uint8 / 255


def fail(message: str) -> None:
    print(f"check_outside_readers: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def run_doctor(root: Path) -> dict:
    """Every lerobot-doctor check on `root` -> {"version", "summary", "overall", "checks"}."""
    from importlib.metadata import version

    from lerobot_doctor.dataset_loader import load_dataset
    from lerobot_doctor.runner import run_checks

    try:
        loaded = load_dataset(str(root))
    except Exception as e:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        fail(f"lerobot-doctor could not load {root}: {type(e).__name__}: {e}")
    if loaded.info is None:
        fail(f"lerobot-doctor could not load {root}/meta/info.json: {loaded.info_error}")
    report = run_checks(loaded)
    return {
        "version": version("lerobot-doctor"),
        "summary": report.summary_counts,
        "overall": report.overall_severity.value,
        "checks": [{"name": r.name, "severity": r.severity.value,
                    "messages": [[m.severity.value, m.message] for m in r.messages]} for r in report.results],
    }


def to_uint8(frame, where: str):
    """(3, H, W) float32 in [0, 1] from the reader -> (H, W, 3) uint8, exactly (see the module docstring)."""
    import numpy as np

    scaled = frame.numpy().astype(np.float64) * 255.0
    rounded = np.rint(scaled)
    off = float(np.abs(scaled - rounded).max()) if scaled.size else 0.0
    if off > ROUNDING_TOLERANCE or rounded.min() < 0 or rounded.max() > 255:
        fail(f"{where}: the reader's frame is not uint8 / 255 (off by {off:.2e} levels, range "
             f"{rounded.min()}..{rounded.max()})")
    return np.ascontiguousarray(rounded.astype(np.uint8).transpose(1, 2, 0))


def run_reader(root: Path, npz: Path) -> dict:
    """Read every frame of `root` with ledataset; write the stacked values to `npz`; return the summary."""
    from importlib.metadata import version

    import numpy as np

    try:
        from ledataset.datasets.lerobot_dataset import LeRobotDataset
    except Exception as e:  # noqa: BLE001
        fail(f"cannot import ledataset ({type(e).__name__}: {e}); run this with the outside-checkers venv's python")
    try:
        ds = LeRobotDataset(repo_id="local/x", root=root)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        fail(f"ledataset LeRobotDataset(root={root}) raised {type(e).__name__}: {e}")

    cameras = list(ds.meta.camera_keys)
    columns: dict[str, list] = {}
    tasks: list[str] = []
    sha: dict[str, list[str]] = {key: [] for key in cameras}
    for i in range(len(ds)):
        try:
            item = ds[i]
        except Exception as e:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)
            fail(f"ledataset ds[{i}] raised {type(e).__name__}: {e}")
        for key, value in item.items():
            if key == "task":
                tasks.append(str(value))
            elif key in sha:
                frame = to_uint8(value, f"{key} at frame {i}")
                sha[key].append(hashlib.sha256(frame.tobytes()).hexdigest())
                columns.setdefault(key, []).append(frame)
            else:
                columns.setdefault(key, []).append(value.numpy())
    arrays = {key: np.stack(values) for key, values in columns.items()}
    np.savez(npz, **arrays)
    return {
        "version": version("lerobot-dataset"),
        "torch": version("torch"),
        "torchcodec": version("torchcodec"),
        "num_episodes": ds.num_episodes,
        "num_frames": ds.num_frames,
        "fps": ds.fps,
        "video_backend": ds.video_backend,
        "cameras": cameras,
        "arrays": {key: [str(a.dtype), list(a.shape)] for key, a in arrays.items()},
        "task": tasks,
        "frame_sha256": sha,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="a local LeRobot v3.0 dataset")
    parser.add_argument("--npz", type=Path, required=True, help="where to write the reader's values")
    parser.add_argument("--json", type=Path, default=None, help="where to write the JSON report (default: stdout)")
    args = parser.parse_args()
    root = args.path.resolve()
    if not (root / "meta" / "info.json").is_file():
        fail(f"{root} has no meta/info.json: not a LeRobot dataset")
    report = {"path": str(root), "doctor": run_doctor(root), "reader": run_reader(root, args.npz)}
    text = json.dumps(report, indent=1)
    if args.json is None:
        print(text)
    else:
        args.json.write_text(text)
    d = report["doctor"]["summary"]
    print(f"check_outside_readers: {root.name}: lerobot-doctor {d['PASS']} pass, {d['WARN']} warn, {d['FAIL']} fail; "
          f"ledataset read {report['reader']['num_frames']} frames", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
