"""LeRobot v2.1 datasets: converted on open into a v3.0 copy whose values are those lerobot 0.3.3 itself reads.

The fixture and its reference values (expected.json, expected_frames.npz) were written by lerobot 0.3.3
(scripts/make_lerobot_v21_fixture.py). Every test converts a copy of it in tmp_path, never the fixture in place.
"""

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fplus.data import v21
from fplus.data.lerobot import DataKeys, LeRobotDataset
from fplus.data.video import decode_span
from fplus.errors import DataError
from tests.conftest import LOCAL_FIXTURES
from tests.helpers import run_cli

FIXTURE = LOCAL_FIXTURES / "lerobot_v21_av1"
REPO = Path(__file__).resolve().parents[2]
LEROBOT_VENV = Path(os.environ.get("FPLUS_LEROBOT_VENV", "/opt/lerobot-venv"))
CAMERA = "observation.images.image"
KEYS = DataKeys(image=CAMERA, state="observation.state", action="action", instruction="task")
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
FRAMES = np.load(FIXTURE / "expected_frames.npz")["frames"]  # (N, H, W, 3) uint8, as lerobot decodes them


@pytest.fixture
def source(tmp_path) -> Path:
    root = tmp_path / "v21"
    shutil.copytree(FIXTURE, root)
    return root


def source_video(root: Path, episode: int) -> Path:
    return root / f"videos/chunk-000/{CAMERA}/episode_{episode:06d}.mp4"


def test_every_value_equals_what_lerobot_reads(source, capsys):
    ds = LeRobotDataset.open(source, KEYS)
    assert ds.root == source.with_name("v21.fplus-v3.0") and ds.info["codebase_version"] == "v3.0"
    ref = EXPECTED["frames"]
    assert EXPECTED["versions"]["lerobot"] == "0.3.3" and EXPECTED["versions"]["codebase_version"] == "v2.1"
    assert (ds.num_frames, ds.num_episodes, ds.fps) == (EXPECTED["num_frames"], EXPECTED["num_episodes"], 15)
    for key in ("observation.state", "action", "timestamp"):  # float32 -> JSON -> float32 is exact
        values = ds.column(key)
        assert values.dtype == np.float32
        np.testing.assert_array_equal(values, np.asarray(ref[key], np.float32).reshape(values.shape))
    for key in ("index", "episode_index", "frame_index", "task_index"):
        np.testing.assert_array_equal(ds.column(key), np.asarray(ref[key], np.int64))
    assert ds.instructions().tolist() == ref["task"]
    assert [e.length for e in ds.episodes] == [7, 11, 5]
    frames = np.concatenate([ds.episode_frames(CAMERA, e.index) for e in ds.episodes])
    np.testing.assert_array_equal(frames, FRAMES)  # re-muxed, not re-encoded: pixel-identical
    assert [hashlib.sha256(f.tobytes()).hexdigest() for f in frames] == ref["frame_sha256"]
    np.testing.assert_array_equal(np.stack([ds.frame_at(CAMERA, i) for i in range(ds.num_frames)]), FRAMES)


def test_statistics_aggregate_lerobot_s_per_episode_ones(source):
    stats = LeRobotDataset.open(source).stats
    for key, ref in EXPECTED["stats"].items():
        for name in ("min", "max", "count"):
            np.testing.assert_array_equal(np.asarray(stats[key][name]).reshape(np.shape(ref[name])), ref[name])
        for name in ("mean", "std"):
            np.testing.assert_allclose(np.asarray(stats[key][name]).reshape(np.shape(ref[name])), ref[name],
                                       rtol=1e-12, atol=1e-15)
    for key in ("action", "observation.state"):  # quantiles: from every frame's value, not aggregated
        values = np.asarray(EXPECTED["frames"][key], np.float32).astype(np.float64)
        np.testing.assert_array_equal(stats[key]["q01"], np.quantile(values, 0.01, axis=0))
        np.testing.assert_array_equal(stats[key]["q99"], np.quantile(values, 0.99, axis=0))
    assert "q01" not in stats[CAMERA]  # cameras: would need every frame decoded


def test_conversion_says_where_and_the_second_open_reuses_the_copy(source, capsys):
    ds = LeRobotDataset.open(source)
    err = capsys.readouterr().err
    assert err == (f"{source}: LeRobot v2.1 dataset, converting it once to v3.0 into {ds.root}; later opens reuse "
                   "that copy\n")
    stamp = json.loads((ds.root / v21.STAMP).read_text())
    assert stamp["source"] == str(source) and stamp["fingerprint"] == v21.source_fingerprint(source)
    made = {p: p.stat().st_mtime_ns for p in ds.root.rglob("*")}
    again = LeRobotDataset.open(source)
    assert capsys.readouterr().err == "" and again.root == ds.root
    assert {p: p.stat().st_mtime_ns for p in again.root.rglob("*")} == made
    assert again.fingerprint == ds.fingerprint
    assert sorted(p.name for p in source.parent.iterdir()) == ["v21", "v21.fplus-v3.0", "v21.fplus-v3.0.lock"]


def test_a_changed_source_is_converted_again(source, capsys):
    LeRobotDataset.open(source)
    capsys.readouterr()
    tasks = source / "meta/tasks.jsonl"
    tasks.write_text(tasks.read_text().replace("open the drawer", "close the drawer"))
    ds = LeRobotDataset.open(source)
    assert "(the copy there is out of date or incomplete)" in capsys.readouterr().err
    assert ds.tasks == ["put the red block in the bowl", "close the drawer"]


def test_a_half_written_conversion_is_never_used(source, monkeypatch, capsys):
    target = v21.converted_path(source)
    calls = []
    real_add = v21._Remuxer.add

    def dies_on_episode_2(self, src, where, row):
        calls.append(where)
        if "episode 2" in where:
            raise KeyboardInterrupt  # killed mid-way
        return real_add(self, src, where, row)

    monkeypatch.setattr(v21._Remuxer, "add", dies_on_episode_2)
    with pytest.raises(KeyboardInterrupt):
        LeRobotDataset.open(source)
    assert len(calls) == 3 and not target.exists()
    assert not list(source.parent.glob("*.partial-*")), "the partial copy is removed"
    monkeypatch.undo()
    # What a kill -9 leaves: a partial directory, and a copy without its stamp (or with another source's).
    (source.parent / f"{target.name}.partial-dead").mkdir()
    ds = LeRobotDataset.open(source)
    (ds.root / v21.STAMP).unlink()
    capsys.readouterr()
    ds = LeRobotDataset.open(source)
    assert "out of date or incomplete" in capsys.readouterr().err
    assert not list(source.parent.glob("*.partial-*")) and (ds.root / v21.STAMP).is_file()
    np.testing.assert_array_equal(ds.episode_frames(CAMERA, 2), FRAMES[18:])


@pytest.mark.parametrize("version", ["v2.0", "v1.6", "v3.1"])
def test_other_versions_are_refused_with_what_to_do(source, version):
    info = json.loads((source / "meta/info.json").read_text())
    info["codebase_version"] = version
    (source / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(DataError) as err:
        LeRobotDataset.open(source)
    msg = str(err.value)
    assert msg.startswith(f"{source / 'meta/info.json'}: codebase_version {version!r}; fplus reads LeRobot v3.0 "
                          "and converts v2.1 on open: convert it with the lerobot library first")
    assert "convert_dataset_v20_to_v21" in msg and "convert_dataset_v21_to_v30" in msg and "\n" not in msg
    assert not v21.converted_path(source).exists()


def test_broken_v21_metadata_and_data_are_named(source):
    (source / "meta/episodes_stats.jsonl").unlink()
    with pytest.raises(DataError, match=r"codebase_version 'v2.1' but .*meta/episodes_stats.jsonl is missing"):
        LeRobotDataset.open(source)
    shutil.copy(FIXTURE / "meta/episodes_stats.jsonl", source / "meta/episodes_stats.jsonl")
    episodes = source / "meta/episodes.jsonl"
    episodes.write_text(episodes.read_text().replace('"length": 11', '"length": 12'))
    with pytest.raises(DataError, match=r"episode_000001.parquet: 11 rows but meta/episodes.jsonl says episode 1 "
                                        r"has 12"):
        LeRobotDataset.open(source)
    assert not list(source.parent.glob("*.partial-*")) and not v21.converted_path(source).exists()


def test_an_episode_with_other_stream_parameters_starts_a_new_video_file(source):
    """Episode 1 re-encoded as H.264 with B-frames (negative dts, reordered pts): packets cannot join an AV1 file,
    so episodes 0, 1, 2 land in files 0, 1, 2; every frame still equals the source file's own decoding."""
    import av

    path = source_video(source, 1)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=15, options={"bf": "3", "g": "4"})
        stream.width, stream.height, stream.pix_fmt = 40, 24, "yuv420p"
        for frame in FRAMES[7:18]:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    ds = LeRobotDataset.open(source)
    assert [(e.videos[CAMERA].file_index, e.videos[CAMERA].from_ts) for e in ds.episodes] == [(0, 0.0), (1, 0.0),
                                                                                             (2, 0.0)]
    for ep in ds.episodes:
        own, _ = decode_span(source_video(source, ep.index), 0.0, ep.length / 15, 15)
        np.testing.assert_array_equal(ds.episode_frames(CAMERA, ep.index), own)
        np.testing.assert_array_equal(np.stack([ds.frame_at(CAMERA, i) for i in range(ep.start, ep.stop)]), own)


def test_b_frame_episodes_concatenate_into_one_file(source):
    """All episodes H.264 with B-frames: one file, each episode starting where the previous one ends."""
    import av

    start = 0
    for ep, length in enumerate([7, 11, 5]):
        with av.open(str(source_video(source, ep)), "w") as out:
            stream = out.add_stream("libx264", rate=15, options={"bf": "2", "g": "3"})
            stream.width, stream.height, stream.pix_fmt = 40, 24, "yuv420p"
            for frame in FRAMES[start:start + length]:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        start += length
    ds = LeRobotDataset.open(source)
    spans = [ep.videos[CAMERA] for ep in ds.episodes]
    assert {s.file_index for s in spans} == {0}
    np.testing.assert_allclose([s.from_ts for s in spans], [0, 7 / 15, 18 / 15], atol=1e-9)
    for ep in ds.episodes:
        own, _ = decode_span(source_video(source, ep.index), 0.0, ep.length / 15, 15)
        np.testing.assert_array_equal(ds.episode_frames(CAMERA, ep.index), own)
        np.testing.assert_array_equal(np.stack([ds.frame_at(CAMERA, i) for i in range(ep.start, ep.stop)]), own)


def test_the_copy_of_a_hub_dataset_lives_outside_its_snapshot(tmp_path):
    snapshot = tmp_path / "hub" / "datasets--org--name" / "snapshots" / "0123abcd"
    assert v21.converted_path(snapshot, "org/name") == tmp_path / "hub/datasets--org--name/fplus-v3.0/0123abcd"
    assert v21.converted_path(tmp_path / "mine", None) == tmp_path / "mine.fplus-v3.0"


def test_two_conversions_give_the_same_dataset_fingerprint(source, tmp_path):
    other = tmp_path / "elsewhere" / "v21"
    shutil.copytree(FIXTURE, other)
    assert LeRobotDataset.open(source).fingerprint == LeRobotDataset.open(other).fingerprint


def test_fplus_data_info_on_a_v21_dataset(source):
    result = run_cli("data", "info", source, "--image-key", CAMERA, "--instruction-key", "task",
                     "--state-key", "observation.state", "--action-key", "action")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "LeRobot v2.1 dataset, converting it once to v3.0 into" in result.stderr
    out = " ".join(result.stdout.split())
    assert "episodes 3 frames 23 tasks 2 fps 15 robot toy_arm" in out
    assert "v21.fplus-v3.0" in out and "all configured keys exist" in out and "open the drawer" in out
    again = run_cli("data", "info", source)
    assert again.exit_code == 0 and "converting" not in again.stderr



@pytest.mark.skipif(not (LEROBOT_VENV / "bin/python").exists(),
                    reason=f"no lerobot venv at {LEROBOT_VENV} (build it: bash scripts/lerobot_compat_env.sh)")
def test_lerobot_0_4_reads_the_converted_copy_as_lerobot_0_3_reads_the_source(source):
    root = LeRobotDataset.open(source).root
    out = subprocess.run([str(LEROBOT_VENV / "bin/python"), str(REPO / "scripts/check_lerobot_reads.py"), str(root),
                          "--all-frames"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["codebase_version"] == "v3.0" and summary["all_frames_loaded"] and not summary["problems"]
    assert (summary["num_frames"], summary["num_episodes"]) == (23, 3)
    ref = EXPECTED["frames"]
    for frame in summary["frames"]:  # the first and last frame of every episode, rounded to 6 decimals
        i = frame["index"]
        assert frame["task"] == ref["task"][i] and frame["timestamp"] == pytest.approx(ref["timestamp"][i], abs=1e-6)
        for key in ("observation.state", "action"):
            np.testing.assert_allclose(frame[key], ref[key][i], atol=1e-6)
        np.testing.assert_allclose(frame[CAMERA]["mean_rgb"], FRAMES[i].reshape(-1, 3).mean(0), atol=0.006)
