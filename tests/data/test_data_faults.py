"""Injected dataset faults: every one is an FplusError naming the file (and key, episode, frame or line), and
nothing half-written survives a failed or interrupted write (DESIGN 12)."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fplus.data import writer as writer_module
from fplus.data.lerobot import LeRobotDataset
from fplus.data.video import VideoEncoder
from fplus.data.writer import LeRobotWriter
from fplus.doctor import check_dataset
from fplus.errors import FplusError
from tests.helpers import CAM, toy_settings, write_toy_dataset

DATA = "data/chunk-000/file-000.parquet"
VIDEO = f"videos/{CAM}/chunk-000/file-000.mp4"
RESTORE = "restore it from the dataset's source"
FPLUS = str(Path(sys.executable).with_name("fplus"))


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """A finished toy dataset: episodes of 12, 9, 15, 11, 10 frames (global rows 0, 12, 21, 36, 47)."""
    root = tmp_path_factory.mktemp("faults") / "ds"
    write_toy_dataset(root)
    return root


@pytest.fixture
def copy(toy, tmp_path) -> Path:
    shutil.copytree(toy, tmp_path / "ds")
    return tmp_path / "ds"


def set_values(root: Path, key: str, cells: dict[tuple[int, int], float]) -> None:
    """Overwrite cells {(global row, dim): value} of a vector column in the data file."""
    path = root / DATA
    table = pq.read_table(path)
    column = table.column(key).combine_chunks()
    values = column.flatten().to_numpy().reshape(len(column), -1).copy()
    for (row, dim), value in cells.items():
        values[row, dim] = value
    array = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), column.type.value_type), values.shape[1])
    pq.write_table(table.set_column(table.column_names.index(key), key, array), path)


def one_line_cli_error(args: list[str], cwd: Path) -> str:
    out = subprocess.run([FPLUS, *args], capture_output=True, text=True, cwd=cwd, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    return out.stderr


# ----- non-finite values ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value"), [("action", np.nan), ("observation.state", np.inf),
                                            ("action", -np.inf)])
def test_nonfinite_value_names_key_episode_frame_and_file(copy, key, value):
    set_values(copy, key, {(38, 1): value, (40, 0): value, (50, 1): value})  # episode 3 frames 2, 4; episode 4
    ds = LeRobotDataset.open(copy)  # opening reads meta/ only
    expected = (f"{copy}: {key} has 3 non-finite values (NaN/inf) in 2 episodes, first at episode 3 frame 2 "
                f"(global index 38, {DATA}); fix or drop episodes 3, 4")
    with pytest.raises(FplusError) as err:
        ds.column(key)  # what training reads
    assert str(err.value) == expected
    with pytest.raises(FplusError, match=re.escape(expected)):
        ds.episode_of_frames()  # any read of the frame table
    assert ds.value_problems() == [expected]


def test_one_bad_value_in_one_episode_says_that_episode(copy):
    set_values(copy, "action", {(5, 0): np.nan})
    assert LeRobotDataset.open(copy).value_problems() == [
        f"{copy}: action has 1 non-finite value (NaN/inf) in 1 episode, first at episode 0 frame 5 (global index 5, "
        f"{DATA}); fix or drop that episode"]


def test_nonfinite_statistics_are_refused(copy):
    stats = json.loads((copy / "meta/stats.json").read_text())
    stats["action"]["std"][0] = float("nan")  # json writes NaN
    (copy / "meta/stats.json").write_text(json.dumps(stats))
    ds = LeRobotDataset.open(copy)
    with pytest.raises(FplusError, match=r"meta/stats.json: action/std holds non-finite values \(NaN/inf\); fix"):
        ds.stats  # noqa: B018 -- what the policy normalises with
    assert len(ds.value_problems()) == 1


def test_data_info_and_doctor_report_nonfinite_values(copy, tmp_path):
    set_values(copy, "observation.state", {(13, 0): np.nan})
    stderr = one_line_cli_error(["data", "info", str(copy)], tmp_path)
    assert "observation.state has 1 non-finite value (NaN/inf) in 1 episode, first at episode 1 frame 1" in stderr
    checks, ds = check_dataset(toy_settings(tmp_path, copy))
    by_name = {c.name: c for c in checks}
    assert by_name["dataset"].status == "ok" and by_name["dataset keys"].status == "ok"
    assert by_name["dataset values"].status == "fail" and "episode 1 frame 1 (global index 13" in \
        by_name["dataset values"].detail
    assert ds is None  # the later checks are not run on values the frame table refuses


def test_clean_dataset_passes_the_value_check(toy, tmp_path):
    assert LeRobotDataset.open(toy).value_problems() == []
    checks, ds = check_dataset(toy_settings(tmp_path, toy))
    values = {c.name: c for c in checks}["dataset values"]
    assert values.status == "ok" and "no NaN/inf in" in values.detail and "action" in values.detail
    assert ds.num_episodes == LeRobotDataset.open(toy).num_episodes  # the later checks get the opened dataset


def test_writer_refuses_nonfinite_values(tmp_path):
    w = LeRobotWriter(tmp_path / "ds", fps=10, features={
        "action": {"dtype": "float32", "shape": [2], "names": ["a", "b"]}})
    action = np.zeros((6, 2), np.float32)
    action[4, 1] = np.nan
    with pytest.raises(FplusError, match=r"action of episode 0 \('t'\) has 1 non-finite values \(NaN/inf\), first "
                                         "at frame 4; fix the recording"):
        w.add_episode("t", {"action": action})
    w.abort()
    assert not (tmp_path / "ds").exists() and not (tmp_path / "ds.partial").exists()


# ----- damaged metadata, parquet and video files ------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _garbage_value(path: Path) -> None:
    path.write_text(path.read_text().replace('"fps": 10', '"fps": 1x0', 1).replace('"min": [', '"min": [1x', 1))


def _non_utf8(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[:40] + b"\xff\xfe" + raw[40:])


@pytest.mark.parametrize("name", ["meta/info.json", "meta/stats.json"])
@pytest.mark.parametrize(("damage", "pattern"), [
    (_truncate, r"truncated JSON \(the file ends early\) at line \d+ column \d+"),
    (_garbage_value, r"invalid JSON \(Expecting ',' delimiter\) at line \d+ column \d+"),
    (_non_utf8, r"not UTF-8 text \(byte 0xff at line \d+ column \d+\)"),
    (lambda p: p.write_text("[1, 2]"), r"expected a JSON object, got a list"),
])
def test_damaged_meta_json_names_file_and_line(copy, tmp_path, name, damage, pattern):
    damage(copy / name)
    expected = rf"^{re.escape(str(copy / name))}: {pattern}; {RESTORE}"
    with pytest.raises(FplusError, match=expected):
        LeRobotDataset.open(copy).stats  # noqa: B018 -- info.json is read when opening, stats.json on first use
    if name == "meta/info.json":
        assert re.search(expected[1:], one_line_cli_error(["data", "info", str(copy)], tmp_path))
        [check], _ = check_dataset(toy_settings(tmp_path, copy))
        assert check.name == "dataset" and check.status == "fail" and str(copy / name) in check.detail


def test_info_json_without_usable_features_or_fps(copy):
    info = json.loads((copy / "meta/info.json").read_text())
    (copy / "meta/info.json").write_text(json.dumps({**info, "features": ["action"]}))
    with pytest.raises(FplusError, match=r"meta/info.json: `features` is not an object; restore"):
        LeRobotDataset.open(copy)
    (copy / "meta/info.json").write_text(json.dumps({**info, "fps": "ten"}))
    with pytest.raises(FplusError, match=r"meta/info.json: fps is 'ten', expected a positive number; restore"):
        LeRobotDataset.open(copy)


@pytest.mark.parametrize("name", [DATA, "meta/tasks.parquet", "meta/episodes/chunk-000/file-000.parquet"])
def test_unreadable_parquet_names_the_file(copy, tmp_path, name):
    _truncate(copy / name)
    with pytest.raises(FplusError, match=rf"^{re.escape(str(copy / name))}: cannot be read as parquet \(Parquet "
                                         rf"magic bytes not found in footer.*\); {RESTORE}"):
        ds = LeRobotDataset.open(copy)
        ds.tasks, ds.column("action")  # noqa: B018
    checks, _ = check_dataset(toy_settings(tmp_path, copy))
    assert any(c.status == "fail" and str(copy / name) in c.detail for c in checks)


def test_data_file_without_an_index_column(copy):
    table = pq.read_table(copy / DATA)
    pq.write_table(table.drop_columns(["frame_index"]), copy / DATA)
    with pytest.raises(FplusError, match=rf"{re.escape(str(copy / DATA))}: column 'frame_index' is missing"):
        LeRobotDataset.open(copy).column("action")


def test_garbage_inside_a_video_names_file_camera_episode_and_time(copy):
    path = copy / VIDEO
    raw = bytearray(path.read_bytes())
    start = len(raw) // 3
    raw[start:start + 3000] = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(raw))
    ds = LeRobotDataset.open(copy)
    errors = []
    for episode in range(ds.num_episodes):
        try:
            ds.episode_frames(CAM, episode)
        except FplusError as err:
            errors.append(str(err))
    assert errors, "the damaged video decoded without an error"
    assert all(re.match(rf"{re.escape(str(path))} \(camera {re.escape(CAM)}, episode \d\): video cannot be decoded "
                        rf"near t=\d+\.\d+s of the file \(.*\); restore the file from the dataset's source", e)
               for e in errors), errors


def test_a_file_that_is_not_a_video(copy):
    path = copy / VIDEO
    path.write_bytes(b"\0garbage" * 100)
    ds = LeRobotDataset.open(copy)
    prefix = rf"^{re.escape(str(path))} \(camera {re.escape(CAM)}, episode 2\): not a readable video \(Invalid data"
    with pytest.raises(FplusError, match=prefix):
        ds.episode_frames(CAM, 2)
    with pytest.raises(FplusError, match=prefix):
        ds.frame_at(CAM, 25)  # random access (training's frame store) says the same
    path.unlink()
    with pytest.raises(FplusError, match=rf"video file missing: {re.escape(str(path))} \(camera"):
        ds.frame_at(CAM, 3)


# ----- a full disk while writing a dataset ------------------------------------------------------------------------


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize(("target", "attribute", "file"), [
    (pq.ParquetWriter, "write_table", DATA),
    (VideoEncoder, "write", VIDEO),
    (writer_module.pq, "write_table", "meta/tasks.parquet"),
    (Path, "write_text", "meta/stats.json"),
])
def test_disk_full_removes_the_partial_dataset(tmp_path, monkeypatch, target, attribute, file):
    monkeypatch.setattr(target, attribute, _enospc)
    root = tmp_path / "ds"
    with pytest.raises(FplusError) as err:
        write_toy_dataset(root, lengths=(4, 3))
    assert re.fullmatch(rf"disk full while writing {re.escape(str(tmp_path / 'ds.partial' / file))} \(\S+ \S+ left "
                        rf"on that disk\); the partial dataset {re.escape(str(tmp_path / 'ds.partial'))} was removed "
                        rf"and {re.escape(str(root))} is unchanged: free space \(or write elsewhere\) and run again",
                        str(err.value)), str(err.value)
    assert sorted(os.listdir(tmp_path)) == []


def test_disk_full_while_overwriting_keeps_the_old_dataset(toy, tmp_path, monkeypatch):
    root = tmp_path / "ds"
    shutil.copytree(toy, root)
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    monkeypatch.setattr(Path, "write_text", _enospc)  # stats.json, in finalize: everything else was written
    w = LeRobotWriter(root, fps=10, features={"action": {"dtype": "float32", "shape": [1], "names": None}},
                      overwrite=True)
    w.add_episode("t", {"action": np.zeros((3, 1), np.float32)})
    with pytest.raises(FplusError, match="disk full while writing .*meta/stats.json"):
        w.finalize()
    assert {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(tmp_path)) == ["ds"]


def test_failed_finalize_never_leaves_a_dataset_that_looks_valid(tmp_path, monkeypatch):
    """info.json is written last: whatever fails before it, no directory holding an info.json appears."""
    monkeypatch.setattr(writer_module.LeRobotWriter, "_write_episodes", lambda self: _enospc())
    with pytest.raises(FplusError, match="disk full"):
        write_toy_dataset(tmp_path / "ds", lengths=(3,))
    assert not list(tmp_path.rglob("info.json"))


# ----- interrupting `fplus data demo` -----------------------------------------------------------------------------

FAKE_DEMO = """
import signal, sys, time
from types import SimpleNamespace
import numpy as np
from fplus.data import demo
signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background


class Env:
    def __init__(self, task, image_size, max_steps):
        self.size = image_size
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return False


def episode(env, seed, steps_after_success):
    time.sleep(0.15)
    rng = np.random.default_rng(seed)
    return SimpleNamespace(success=True, num_steps=5,
                           images=rng.integers(0, 256, (5, env.size, env.size, 3), dtype=np.uint8),
                           state=rng.normal(size=(5, 4)).astype(np.float32),
                           action=rng.uniform(-1, 1, size=(5, 4)).astype(np.float32))


demo.MetaWorldEnv, demo.run_expert_episode = Env, episode
demo.check_task, demo.task_description = (lambda task: None), (lambda task: f"do {task}")
from fplus.cli.main import main
sys.argv = ["fplus", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_demo_leaves_no_partial_dataset(toy, tmp_path, signum, code, existing):
    script = tmp_path / "demo.py"
    script.write_text(FAKE_DEMO)
    out = tmp_path / "demo"
    if existing:
        shutil.copytree(toy, out)
    args = ["data", "demo", "--out", str(out), "--tasks", "reach-v3", "--episodes", "40", "--image-size", "32",
            *(["--overwrite"] if existing else [])]
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path, env={**os.environ, "COLUMNS": "400"})
    partial = tmp_path / "demo.partial" / DATA
    deadline = time.time() + 60
    while time.time() < deadline and not partial.is_file() and proc.poll() is None:
        time.sleep(0.02)
    assert partial.is_file(), proc.communicate()[1]
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    kept = f"{out} still holds the dataset it held before" if existing else f"nothing was written to {out}"
    name = signal.Signals(signum).name
    assert re.fullmatch(rf"interrupted: {name} after \d+ of 40 episodes: the partial recording was removed and "
                        rf"{re.escape(kept)}; record it with `fplus data demo --out {re.escape(str(out))} .*`\n",
                        stderr), stderr
    assert not (tmp_path / "demo.partial").exists()
    if existing:
        assert LeRobotDataset.open(out).num_frames == LeRobotDataset.open(toy).num_frames
    else:
        assert not out.exists()
