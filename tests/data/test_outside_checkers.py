"""Two third-party LeRobot tools from PyPI check what fplus writes: lerobot-doctor 0.2.0's diagnostics and the
standalone lerobot-dataset 0.4.4 reader (`ledataset`), in a venv of their own (they need torch, torchcodec and a
torchvision stand-in; build it with `bash scripts/outside_checkers_env.sh`, FPLUS_OUTSIDE_VENV names it, default
.outside-venv).

scripts/check_outside_readers.py runs both on a dataset; here on a small Meta-World demo dataset written by
`make_demo_dataset` (2 tasks x 2 episodes) and, for comparison, on a fixture written by the lerobot library.
Asserted: lerobot-doctor reports no FAIL and PASSes its format checks (its WARNs are about the data's content and
are listed in the test's output and its junit properties); ledataset reads every frame to exactly fplus's values:
index columns, timestamps, states and actions bit-exact (same dtype), the task string of every frame, and every
video frame the same uint8 array (and sha256).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fplus.data.lerobot import LeRobotDataset
from tests.conftest import LOCAL_FIXTURES

REPO = Path(__file__).resolve().parents[2]
OUTSIDE_VENV = Path(os.environ.get("FPLUS_OUTSIDE_VENV", REPO / ".outside-venv"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (OUTSIDE_VENV / "bin/python").exists(),
                       reason=f"no outside-checkers venv at {OUTSIDE_VENV} (build it: bash "
                              "scripts/outside_checkers_env.sh, or set FPLUS_OUTSIDE_VENV)"),
]
# lerobot-doctor's checks about the format (the others judge the content: action jumps, episode lengths, ...)
FORMAT_CHECKS = ["Metadata & Format Compliance", "Temporal Consistency", "Video Integrity", "Feature Consistency",
                 "Portability"]
ALL_CHECKS = 11


@pytest.fixture(scope="module")
def demo_dataset(tmp_path_factory) -> Path:
    pytest.importorskip("metaworld")
    from fplus.data.demo import make_demo_dataset

    report = make_demo_dataset(tmp_path_factory.mktemp("outside") / "demo", tasks=["reach-v3",
                               "button-press-topdown-v3"], episodes_per_task=2, image_size=48, seed=0,
                               max_steps=100, progress=False)
    return report.path


def run_outside_checkers(root: Path, tmp: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """scripts/check_outside_readers.py on `root` in the venv -> (its JSON report, the reader's arrays)."""
    npz, report = tmp / "reader.npz", tmp / "report.json"
    out = subprocess.run([str(OUTSIDE_VENV / "bin/python"), str(REPO / "scripts/check_outside_readers.py"), str(root),
                          "--npz", str(npz), "--json", str(report)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    with np.load(npz) as values:
        return json.loads(report.read_text()), {k: values[k] for k in values.files}


def messages_of(doctor: dict, severity: str) -> list[str]:
    """lerobot-doctor's messages of one severity ("WARN", "FAIL"), each as "check name: message"."""
    return [f"{c['name']}: {text}" for c in doctor["checks"] for level, text in c["messages"] if level == severity]


@pytest.mark.parametrize("which", ["fplus demo", "lerobot_v30_av1_multicam"])
def test_outside_checkers_read_exactly_what_fplus_reads(which, request, tmp_path, record_property):
    root = request.getfixturevalue("demo_dataset") if which == "fplus demo" else LOCAL_FIXTURES / which
    report, values = run_outside_checkers(root, tmp_path)

    doctor = report["doctor"]
    warns = messages_of(doctor, "WARN")
    record_property("lerobot_doctor_summary", json.dumps(doctor["summary"]))
    record_property("lerobot_doctor_warnings", json.dumps(warns))
    print(f"\nlerobot-doctor {doctor['version']} on {which}: {doctor['summary']}\n  " + "\n  ".join(warns))
    failed = messages_of(doctor, "FAIL")
    assert doctor["summary"]["FAIL"] == 0 and not failed, f"lerobot-doctor FAILs: {failed}; WARNs: {warns}"
    assert sum(doctor["summary"].values()) == len(doctor["checks"]) == ALL_CHECKS
    severity = {c["name"]: c["severity"] for c in doctor["checks"]}
    assert {name: severity[name] for name in FORMAT_CHECKS} == dict.fromkeys(FORMAT_CHECKS, "PASS"), warns

    ds = LeRobotDataset.open(root)
    reader = report["reader"]
    assert (reader["num_episodes"], reader["num_frames"], reader["fps"]) == (ds.num_episodes, ds.num_frames, ds.fps)
    assert reader["video_backend"] == "torchcodec" and reader["cameras"] == ds.camera_keys
    assert sorted(values) == sorted(ds.features)  # every feature, index columns included
    for key in ds.features:
        if key in ds.camera_keys:
            continue
        ours = ds.column(key)
        assert values[key].dtype == ours.dtype and values[key].shape == ours.shape, key
        np.testing.assert_array_equal(values[key], ours, err_msg=key, strict=True)  # bit-exact
    assert reader["task"] == list(ds.instructions())
    for key in ds.camera_keys:
        ours = ds.frames(key, np.arange(ds.num_frames))
        assert values[key].dtype == np.uint8 and values[key].shape == ours.shape == (ds.num_frames,
                                                                                    *ds.features[key]["shape"])
        mismatched = np.nonzero((values[key] != ours).reshape(ds.num_frames, -1).any(1))[0]
        assert not len(mismatched), f"{key}: frames {mismatched[:10].tolist()} differ"
        assert reader["frame_sha256"][key] == [hashlib.sha256(f.tobytes()).hexdigest() for f in ours]
