import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fplus.data.lerobot import LeRobotDataset
from fplus.data.writer import LeRobotWriter
from fplus.errors import FplusError
from fplus.world.cache import CONTENT_HASH, LATENTS, PROGRESS, compute_latents, load_latents, read_manifest
from fplus.world.encoders import build_encoder
from tests.helpers import run_cli

KEY = "observation.images.image"


def encoder(source="dino"):
    return build_encoder(source, dino_model="tiny", vjepa_model="tiny", pooling="cls", temporal_window=4)


def make_dataset(root: Path, lengths=(9, 14, 7), invert_after: tuple[int, int] | None = None) -> LeRobotDataset:
    """Random-texture episodes; `invert_after=(episode, t)` inverts that episode's frames after t."""
    rng = np.random.default_rng(0)
    w = LeRobotWriter(root, fps=10, features={
        KEY: {"dtype": "video", "shape": [32, 32, 3], "names": ["height", "width", "channels"]},
        "action": {"dtype": "float32", "shape": [2], "names": ["a", "b"]}})
    for e, n in enumerate(lengths):
        frames = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        if invert_after and invert_after[0] == e:
            frames[invert_after[1] + 1:] = 255 - frames[invert_after[1] + 1:]
        w.add_episode(f"task {e}", {KEY: frames, "action": np.zeros((n, 2), np.float32)})
    return LeRobotDataset.open(w.finalize())


@pytest.mark.parametrize("source", ["dino", "vjepa"])
def test_both_sources_on_the_shared_fixture(libero_fixture, tmp_path, source):
    ds = LeRobotDataset.open(libero_fixture)
    enc = encoder(source)
    for key in ("observation.images.image", "observation.images.wrist_image"):
        result = compute_latents(ds, key, enc, tmp_path, batch_size=16, progress=False)
        z = load_latents(result.entry, ds, key, source=source, encoder_id="tiny")
        assert z.shape == (48, enc.dim) and z.dtype == np.float16 and np.isfinite(z).all()
        manifest = read_manifest(result.entry)
        assert manifest["num_frames"] == 48 and manifest["image_key"] == key and manifest["complete"]
        assert manifest["dataset_fingerprint"] == ds.fingerprint and manifest["temporal_window"] == enc.temporal_window
        assert not (result.entry / PROGRESS).exists()
        # independent computation: every episode decoded whole, its causal clips (clamped at the episode start)
        # encoded in one batch; the cache holds them in float16 (half an ulp: 2^-11 relative) after batches of 16
        # (float32 noise of another batch composition: ~1e-6)
        clips = []
        for episode in ds.episodes:
            frames = ds.episode_frames(key, episode.index)
            for t in range(len(frames)):
                clips.append(frames[[max(0, t - enc.temporal_window + 1 + j) for j in range(enc.temporal_window)]])
        expected = enc.encode_frames(torch.from_numpy(np.stack(clips))).numpy()
        np.testing.assert_allclose(z.astype(np.float32), expected, rtol=2**-10, atol=1e-4)
    # distinct frames give distinct latents; the two cameras differ
    assert len(np.unique(z.astype(np.float32), axis=0)) > 40


def test_rerun_is_a_no_op(tmp_path):
    ds = make_dataset(tmp_path / "ds")
    first = compute_latents(ds, KEY, encoder(), tmp_path / "c", batch_size=8, progress=False)
    mtime = (first.entry / LATENTS).stat().st_mtime_ns
    again = compute_latents(ds, KEY, encoder(), tmp_path / "c", batch_size=8, progress=False)
    assert (first.status, again.status, again.frames_computed) == ("computed", "complete", 0)
    assert (first.entry / LATENTS).stat().st_mtime_ns == mtime


@pytest.mark.parametrize("source", ["dino", "vjepa"])
def test_changing_a_later_frame_leaves_earlier_latents_unchanged(tmp_path, source):
    a = make_dataset(tmp_path / "a")
    b = make_dataset(tmp_path / "b", invert_after=(1, 6))  # episode 1 spans rows 9..22; rows > 15 change
    za = load_latents(compute_latents(a, KEY, encoder(source), tmp_path / "ca", 8, progress=False).entry, a, KEY)
    zb = load_latents(compute_latents(b, KEY, encoder(source), tmp_path / "cb", 8, progress=False).entry, b, KEY)
    np.testing.assert_array_equal(za[:16], zb[:16])
    assert not np.allclose(za[16:23], zb[16:23])
    np.testing.assert_array_equal(za[23:], zb[23:])  # the next episode does not see episode 1


def test_resume_after_interruption_is_byte_identical(tmp_path, monkeypatch):
    ds = make_dataset(tmp_path / "ds")
    clean = compute_latents(ds, KEY, encoder("vjepa"), tmp_path / "clean", batch_size=4, progress=False)

    enc = encoder("vjepa")
    calls = {"n": 0}
    original = enc.encode_frames

    def crash_on_third(clips):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(clips)

    monkeypatch.setattr(enc, "encode_frames", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        compute_latents(ds, KEY, enc, tmp_path / "resumed", batch_size=4, progress=False)
    entry = tmp_path / "resumed" / clean.entry.relative_to(tmp_path / "clean")
    assert json.loads((entry / PROGRESS).read_text()) == {"frames_done": 8}
    with pytest.raises(FplusError, match="unfinished"):
        load_latents(entry, ds, KEY)
    with pytest.raises(FplusError, match="--batch-size 4"):
        compute_latents(ds, KEY, encoder("vjepa"), tmp_path / "resumed", batch_size=5, progress=False)
    result = compute_latents(ds, KEY, encoder("vjepa"), tmp_path / "resumed", batch_size=4, progress=False)
    assert (result.status, result.frames_computed) == ("resumed", 30 - 8)
    assert (entry / LATENTS).read_bytes() == (clean.entry / LATENTS).read_bytes()


KILL_SCRIPT = """
import sys, time
from pathlib import Path
from fplus.data.lerobot import LeRobotDataset
from fplus.world.cache import compute_latents
from fplus.world.encoders import build_encoder
enc = build_encoder("dino", dino_model="tiny", vjepa_model="tiny", pooling="cls", temporal_window=1)
original = enc.encode_frames
def slow(clips):
    time.sleep(float(sys.argv[3]))
    return original(clips)
enc.encode_frames = slow
compute_latents(LeRobotDataset.open(sys.argv[1]), "observation.images.image", enc, Path(sys.argv[2]), 2,
                progress=False)
"""


def test_sigkill_then_resume_is_byte_identical(tmp_path):
    ds = make_dataset(tmp_path / "ds")
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(ds.root), str(tmp_path / "killed"), "0.2"])
    deadline = time.time() + 60
    progress_files = []
    while time.time() < deadline and not progress_files:
        progress_files = list((tmp_path / "killed").rglob(PROGRESS))
        progress_files = [p for p in progress_files if json.loads(p.read_text() or "{}").get("frames_done", 0) >= 4]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert progress_files, "the run never made progress"
    done = json.loads(progress_files[0].read_text())["frames_done"]
    assert 4 <= done < 30
    subprocess.run([sys.executable, str(script), str(ds.root), str(tmp_path / "killed"), "0"], check=True)
    subprocess.run([sys.executable, str(script), str(ds.root), str(tmp_path / "clean"), "0"], check=True)
    killed = next((tmp_path / "killed").rglob(LATENTS))
    clean = next((tmp_path / "clean").rglob(LATENTS))
    assert killed.read_bytes() == clean.read_bytes()
    assert read_manifest(killed.parent)["complete"]


def test_manifest_mismatches_fail_clearly(tmp_path, libero_fixture):
    ds = make_dataset(tmp_path / "ds")
    entry = compute_latents(ds, KEY, encoder(), tmp_path / "c", batch_size=8, progress=False).entry
    other = make_dataset(tmp_path / "other", lengths=(9, 14, 8))
    with pytest.raises(FplusError, match=r"dataset_fingerprint: cache has.*num_frames: cache has 30, expected 31"):
        load_latents(entry, other, KEY)
    same_shape = make_dataset(tmp_path / "same", invert_after=(0, 2))
    with pytest.raises(FplusError, match="dataset_fingerprint: cache has"):
        load_latents(entry, same_shape, KEY)
    with pytest.raises(FplusError, match="image_key: cache has 'observation.images.image', expected 'wrist'"):
        load_latents(entry, ds, "wrist")
    with pytest.raises(FplusError, match="source: cache has 'dino', expected 'vjepa'"):
        load_latents(entry, ds, KEY, source="vjepa")
    with pytest.raises(FplusError, match="no latents manifest"):
        load_latents(tmp_path / "nowhere", ds, KEY)
    # recomputing into an entry made for a changed dataset needs --overwrite
    copy = tmp_path / "c2"
    shutil.copytree(tmp_path / "c", copy)
    manifest = read_manifest(entry)
    manifest["revision"] = "something-else"
    (copy / entry.relative_to(tmp_path / "c") / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FplusError, match="revision: cache has 'something-else'.*--overwrite"):
        compute_latents(ds, KEY, encoder(), copy, batch_size=8, progress=False)
    assert compute_latents(ds, KEY, encoder(), copy, 8, overwrite=True, progress=False).status == "computed"


def test_cli_latents_and_info(libero_fixture, tmp_path):
    args = ["latents", "--dataset", str(libero_fixture), "--image-key", KEY, "--source", "dino",
            "--encoder", "tiny", "--cache-dir", str(tmp_path / "c"), "--batch-size", "16", "--device", "cpu"]
    first = run_cli(*args)
    assert first.exit_code == 0, first.stderr
    assert "computed: 48 frames" in first.stdout
    second = run_cli(*args)
    assert "already complete" in second.stdout
    entry = next((tmp_path / "c").rglob("manifest.json")).parent
    # the command computes what the library computes, byte for byte
    library = compute_latents(LeRobotDataset.open(libero_fixture), KEY, encoder(), tmp_path / "lib", batch_size=16,
                              progress=False)
    assert (entry / LATENTS).read_bytes() == (library.entry / LATENTS).read_bytes()
    assert read_manifest(entry)[CONTENT_HASH] == read_manifest(library.entry)[CONTENT_HASH]
    info = run_cli("latents", "info", str(entry))
    assert info.exit_code == 0 and "num_frames" in info.stdout and " 48 " in info.stdout
    bad = run_cli(*args[:4], "observation.images.top")
    assert bad.exit_code == 1 and "IMAGE_KEY='observation.images.top' is not in the dataset" in bad.stderr
