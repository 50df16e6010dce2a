"""`fplus export RUN OUT` and `FPlusPolicy.from_pretrained`: tiny trained E0 and E2 runs exported, then loaded in a
fresh process (a folder, and a hub id from the local hub cache, offline) with the checkpoint's actions bit for bit;
the model card's numbers are the run's results; OUT is never half-written or overwritten by accident; `--step`; an
exported folder served (no dataset) and evaluated offline with the run's numbers; the push with a fake HfApi."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fplus import batch as K
from fplus.errors import CheckpointError, ConfigError
from fplus.model.policy import FPlusPolicy
from fplus.model.pretrained import MARKER, verify_folder
from tests.deploy.serve_helpers import PROMPTS, ServedRun, ServeProcess, toy_frame, toy_observation
from tests.helpers import compute_toy_latents, run_cli, toy_settings, write_toy_dataset
from tests.helpers import reset_accelerate as _reset_accelerate

SIM_RESULT = {  # the closed-loop result file's layout (fplus.eval.closed_loop._aggregate), numbers made up
    "run": "E2", "experiment": "E2", "step": 2, "simulator": "metaworld", "episodes_per_task": 3,
    "episodes_per_mode": {"none": 3, "zero": 3}, "n_action_steps": 2, "max_steps": 30,
    "tasks": {"reach-v3": {"none": {"successes": 2, "episodes": 3, "rate": 2 / 3, "ci95": [0.2077, 0.9385]},
                           "zero": {"successes": 1, "episodes": 3, "rate": 1 / 3, "ci95": [0.0615, 0.7923]}}},
    "overall": {"none": {"successes": 2, "episodes": 3, "rate": 2 / 3, "ci95": [0.2077, 0.9385]},
                "zero": {"successes": 1, "episodes": 3, "rate": 1 / 3, "ci95": [0.0615, 0.7923]}},
}




@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny E0 and E2 runs (2 steps, a checkpoint after each) on one toy dataset, each evaluated offline under every
    mode; E2 also gets a closed-loop result file. Returns (root, {"E0": run dir, "E2": run dir})."""
    from fplus.eval.offline import evaluate_run
    from fplus.model.corruption import MODES
    from fplus.rundir import run_dir_for, sim_result
    from fplus.train.run import train_run

    root = tmp_path_factory.mktemp("export")
    write_toy_dataset(root / "ds", lengths=(8, 7, 9, 6))
    dirs = {}
    for experiment in ("E0", "E2"):
        s = toy_settings(root, root / "ds", EXPERIMENT=experiment, MAX_STEPS=2, SAVE_EVERY=1, VAL_FRACTION=0.25,
                         EVAL_DEVICE="cpu")
        if experiment == "E2":
            compute_toy_latents(s)
        train_run(s, run_dir_for(s), progress_bar=False)
        _reset_accelerate()
        evaluate_run(run_dir_for(s), MODES, device="cpu")
        dirs[experiment] = run_dir_for(s)
    sim_result(dirs["E2"], "metaworld", 2).write_text(json.dumps(SIM_RESULT))
    return root, dirs


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    """Both runs exported (the newest checkpoint) into OUT/E0 and OUT/E2."""
    root, dirs = runs
    out = tmp_path_factory.mktemp("out")
    for name, run_dir in dirs.items():
        result = run_cli("export", run_dir, out / name)
        assert result.exit_code == 0, result.stderr
        assert f"wrote {out / name} ({name}, step 2" in result.stdout
    return {name: out / name for name in dirs}


def _batch(world_dim: int | None) -> dict:
    """A fixed batch of 2: toy frames, the two instructions, states and (world policies) raw latents (2, 3, D)."""
    g = torch.Generator().manual_seed(7)
    batch = {K.IMAGES: torch.from_numpy(np.stack([toy_frame(6, 12), toy_frame(20, 30)])),
             K.INSTRUCTIONS: list(PROMPTS), K.STATE: torch.tensor([[6.0, 12.0], [20.0, 30.0]])}
    if world_dim:
        batch[K.Z_HIST] = torch.randn(2, 3, world_dim, generator=g)
    return batch


def _actions(policy: FPlusPolicy, batch: dict) -> np.ndarray:
    return policy.predict(policy.processor(batch)).actions.numpy()


def _cache_snapshot(cache: Path, repo: str, folder: Path) -> None:
    """`folder` as snapshot of the hub model repo `repo` in the hub cache `cache`, laid out as a download leaves it
    (blobs, snapshots/<commit>/ symlinks, refs/main)."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = storage / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(file.read_bytes())
        link = storage / "snapshots" / commit / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(commit)


FRESH = """
import sys, numpy as np, torch
from fplus.model.policy import FPlusPolicy
for source, batch, out in zip(sys.argv[1::3], sys.argv[2::3], sys.argv[3::3]):
    policy = FPlusPolicy.from_pretrained(source).eval()
    batch = torch.load(batch)
    np.save(out, policy.predict(policy.processor(batch)).actions.numpy())
"""


@pytest.mark.slow  # a fresh interpreter loading two policies: ~20 s on a busy 2-core machine
def test_from_pretrained_in_a_fresh_process_gives_the_checkpoints_actions_bit_for_bit(runs, exported, tmp_path):
    _, dirs = runs
    cache = tmp_path / "hub"
    _cache_snapshot(cache, "someone/fplus-e2", exported["E2"])
    args, expected = [], {}
    for name, source in (("E0", str(exported["E0"])), ("E2", "someone/fplus-e2")):  # a folder; a hub id, cached
        checkpoint = FPlusPolicy.load(dirs[name] / "checkpoints" / "step-000002" / "policy").eval()
        batch = _batch(checkpoint.config.world_dim)
        torch.save(batch, tmp_path / f"{name}.pt")
        expected[name] = _actions(checkpoint, batch)
        earlier = FPlusPolicy.load(dirs[name] / "checkpoints" / "step-000001" / "policy").eval()
        assert not np.array_equal(_actions(earlier, batch), expected[name])  # the steps' weights differ
        args += [source, str(tmp_path / f"{name}.pt"), str(tmp_path / f"{name}.npy")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-c", FRESH, *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    for name in ("E0", "E2"):
        got = np.load(tmp_path / f"{name}.npy")
        assert got.shape == (2, 4, 2) and np.array_equal(got, expected[name]), name


def test_the_folder_records_what_inference_needs_and_refuses_damage(runs, exported, tmp_path):
    root, dirs = runs
    e2 = json.loads((exported["E2"] / MARKER).read_text())
    config = json.loads((dirs["E2"] / "config.json").read_text())
    latents = next((root / "cache").rglob("manifest.json"))
    assert (e2["experiment"], e2["step"], e2["run"]) == ("E2", 2, "E2")
    assert e2["dataset"]["fingerprint"] == config["dataset_fingerprint"] and e2["dataset"]["id"] == str(root / "ds")
    assert e2["backbone"] == {"id": "tiny", "source": "tiny", "revision": None}
    recorded = json.loads(latents.read_text())
    assert (e2["world_encoder"]["encoder_id"], e2["world_encoder"]["revision"]) == ("tiny", recorded["revision"])
    assert e2["observation"]["image_shape"] == [64, 64, 3] and e2["observation"]["tasks"] == list(PROMPTS)
    assert json.loads((exported["E0"] / MARKER).read_text())["world_encoder"] is None
    assert not (exported["E0"] / "latent_stats.json").exists()
    stats = json.loads((exported["E2"] / "latent_stats.json").read_text())
    policy = FPlusPolicy.load(exported["E2"])
    assert np.allclose(policy.latent_norm.shift.numpy(), stats["mean"])
    norm = json.loads((exported["E2"] / "normalization.json").read_text())
    assert norm["action"]["shift"] == policy.action_norm.shift.tolist()
    assert norm["state"]["scale"] == policy.state_norm.scale.tolist()
    for name in ("config.json", "policy.safetensors", "backbone_trainable.safetensors"):
        assert (exported["E2"] / name).read_bytes() == \
            (dirs["E2"] / "checkpoints" / "step-000002" / "policy" / name).read_bytes()

    damaged = tmp_path / "E2"
    shutil.copytree(exported["E2"], damaged)
    weights = damaged / "policy.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"policy.safetensors does not match its hash in .*fplus_export.json"):
        FPlusPolicy.from_pretrained(damaged)
    (damaged / MARKER).unlink()
    with pytest.raises(CheckpointError, match="is not an exported model folder \\(fplus_export.json missing\\)"):
        FPlusPolicy.from_pretrained(damaged)
    with pytest.raises(CheckpointError, match="'nobody/not-cached' is not a local folder and not in the local hub "
                                              "cache while HF_HUB_OFFLINE=1"):
        FPlusPolicy.from_pretrained("nobody/not-cached")
    with pytest.raises(ConfigError, match="revision='main' applies to hub ids only"):
        FPlusPolicy.from_pretrained(exported["E0"], revision="main")


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def test_the_model_card_states_the_runs_results(runs, exported):
    _, dirs = runs
    card = (exported["E2"] / "README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "fplus" and {"fplus-e2", "world-model", "robotics"} <= set(front["tags"])
    assert "datasets" not in front and "base_model" not in front  # a local dataset, the tiny backbone: no hub ids
    offline = json.loads((dirs["E2"] / "eval" / "offline-step-000002.json").read_text())
    assert {"none", "zero", "random", "oracle", "history"} <= set(offline["modes"])  # shuffle: 1 val episode, n/a
    for mode, m in offline["modes"].items():
        delta = "" if mode == "none" else f"{m['mse_norm'] - offline['modes']['none']['mse_norm']:+.4g}"
        assert _row([mode, f"{m['mse_norm']:.4g}", delta, f"{m['mse_raw']:.4g}", f"{m['cos_world']:.4f}",
                     str(m["samples"])]) in card, mode
    assert _row(["reach-v3", "66.7% [20.8%, 93.8%] (2/3)", "33.3% [6.2%, 79.2%] (1/3)"]) in card
    assert _row(["**all**", "66.7% [20.8%, 93.8%] (2/3)", "33.3% [6.2%, 79.2%] (1/3)"]) in card
    assert "Closed loop in metaworld" in card and f"`{offline['run']}`" not in card
    assert (exported["E2"] / "results" / "sim-metaworld-step-000002.json").is_file()
    fingerprint = json.loads((exported["E2"] / MARKER).read_text())["dataset"]["fingerprint"]
    for needle in ("FPlusPolicy.from_pretrained(", "fplus serve OUT", "fplus eval OUT", f"| fingerprint | "
                   f"`{fingerprint}` |", "| INJECTION | `true` |", "dino `tiny` at revision `random-init-seed0-"):
        assert needle in card, needle
    e0 = (exported["E0"] / "README.md").read_text()
    assert "Closed loop" not in e0 and "WORLD_HISTORY" not in e0 and "| none | " in e0


def test_a_card_with_hub_ids_names_them_in_the_front_matter():
    from fplus.deploy.model_card import front_matter

    marker = {"experiment": "E4", "dataset": {"repo_id": "HuggingFaceVLA/libero", "id": "HuggingFaceVLA/libero"},
              "backbone": {"id": "qwen3-vl-2b", "source": "Qwen/Qwen3-VL-2B-Instruct", "revision": "abc"},
              "world_encoder": None}
    front = yaml.safe_load(front_matter(marker).strip("-\n"))
    assert front["datasets"] == ["HuggingFaceVLA/libero"] and front["base_model"] == "Qwen/Qwen3-VL-2B-Instruct"


def test_out_is_refused_unless_overwrite_and_step_picks_the_checkpoint(runs, exported, tmp_path):
    _, dirs = runs
    out = tmp_path / "model"
    assert run_cli("export", dirs["E0"], out, "--step", "1").exit_code == 0
    assert json.loads((out / MARKER).read_text())["step"] == 1
    again = run_cli("export", dirs["E0"], out)
    assert again.exit_code == 1 and again.stderr.startswith(
        f"error: {out} is not empty: pass --overwrite to replace an earlier export, or choose another directory")
    assert again.stderr.count("\n") == 1  # one line
    assert json.loads((out / MARKER).read_text())["step"] == 1  # untouched
    assert run_cli("export", dirs["E0"], out, "--overwrite").exit_code == 0
    assert json.loads((out / MARKER).read_text())["step"] == 2 and verify_folder(out)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary directory left
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    refused = run_cli("export", dirs["E0"], other, "--overwrite")
    assert refused.exit_code == 1 and "not an earlier export (no fplus_export.json): refusing" in refused.stderr
    assert (other / "notes.txt").read_text() == "mine"
    missing = run_cli("export", dirs["E0"], tmp_path / "x", "--step", "7")
    assert missing.exit_code == 1 and "no checkpoint at step 7" in missing.stderr and "[1, 2]" in missing.stderr
    assert not (tmp_path / "x").exists()
    # the default is the newest VERIFIED checkpoint: a damaged step 2 gives step 1
    copy = tmp_path / "runs" / "E0"
    shutil.copytree(dirs["E0"], copy)
    (copy / "checkpoints" / "step-000002" / "policy" / "policy.safetensors").write_bytes(b"cut")
    assert run_cli("export", copy, tmp_path / "older").exit_code == 0
    assert json.loads((tmp_path / "older" / MARKER).read_text())["step"] == 1


@pytest.mark.slow  # `fplus serve` in a fresh interpreter: ~20 s on a busy 2-core machine
def test_fplus_serve_answers_from_the_folder_without_the_dataset(runs, exported):
    from fplus.deploy.protocol import packb, unpackb
    from fplus.world.encoders import build_encoder

    root, dirs = runs
    reference = ServedRun(dirs["E2"], FPlusPolicy.load(dirs["E2"] / "checkpoints" / "step-000002" / "policy").eval(),
                          build_encoder("dino", dino_model="tiny", vjepa_model="tiny", pooling="cls",
                                        temporal_window=1))
    episode = [toy_observation(t) for t in range(3)]
    (root / "ds").rename(root / "ds-away")  # serving needs nothing but the folder
    try:
        from websockets.sync.client import connect

        with ServeProcess(exported["E2"], "--device", "cpu") as proc:
            with connect(f"ws://{proc.host}:{proc.port}", compression=None, open_timeout=30) as ws:
                meta = unpackb(ws.recv(timeout=30))
                replies = []
                for obs in episode:
                    ws.send(packb(obs))
                    replies.append(unpackb(ws.recv(timeout=60)))
    finally:
        (root / "ds-away").rename(root / "ds")
    assert (meta["experiment"], meta["step"], meta["tasks"]) == ("E2", 2, list(PROMPTS))
    assert meta["observation"]["images"] == {"observation/image": [64, 64, 3]}
    for reply, want in zip(replies, reference.reference(episode), strict=True):
        assert np.array_equal(reply["actions"], want)


def test_serving_refuses_another_world_encoder_revision(exported, tmp_path):
    from fplus.deploy.runner import load_runner
    from fplus.settings import load_settings

    folder = tmp_path / "E2"
    shutil.copytree(exported["E2"], folder)
    marker = json.loads((folder / MARKER).read_text())
    marker["world_encoder"]["revision"] = "0123abc"  # the marker itself is not hashed
    (folder / MARKER).write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match=r"the world encoder loaded here is 'tiny' at revision "
                                              r"'random-init-seed0-\w+', the policy was trained on latents of 'tiny' "
                                              r"at revision '0123abc'"):
        load_runner(folder, None, "cpu", load_settings(None, {}, environ={}, dotenv=None).serve)


def test_fplus_eval_of_the_folder_gives_the_runs_numbers(runs, exported, tmp_path):
    root, dirs = runs
    ran = json.loads((dirs["E2"] / "eval" / "offline-step-000002.json").read_text())
    result = run_cli("eval", exported["E2"], "--corruption", "none,oracle", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    mine = json.loads((exported["E2"] / "eval" / "offline-step-000002.json").read_text())
    assert mine["modes"] == {m: ran["modes"][m] for m in ("none", "oracle")} and mine["world"] == ran["world"]
    verify_folder(exported["E2"])  # eval/ is not part of the export
    # DATASET and CACHE_DIR set by the user replace the recorded paths (the dataset elsewhere, its latents computed
    # there): the same numbers; a different dataset is refused
    moved = tmp_path / "data"
    shutil.copytree(root / "ds", moved)
    compute_toy_latents(toy_settings(tmp_path, moved, CACHE_DIR=tmp_path / "latents"))
    folder = tmp_path / "E2"
    shutil.copytree(exported["E2"], folder)
    env = {"DATASET": str(moved), "CACHE_DIR": str(tmp_path / "latents")}
    assert run_cli("eval", folder, "--corruption", "none", "--device", "cpu", env=env).exit_code == 0
    assert json.loads((folder / "eval" / "offline-step-000002.json").read_text())["modes"]["none"] == \
        ran["modes"]["none"]
    shutil.rmtree(tmp_path / "latents")
    lost = run_cli("eval", folder, "--corruption", "none", "--device", "cpu", env=env)
    assert lost.exit_code == 1 and f"under {tmp_path / 'latents'}" in lost.stderr  # CACHE_DIR was read
    write_toy_dataset(tmp_path / "other", lengths=(5, 5, 5, 5), seed=3)
    other = run_cli("eval", folder, "--corruption", "none", env={"DATASET": str(tmp_path / "other")})
    assert other.exit_code == 1 and "changed since" in other.stderr
    step = run_cli("eval", folder, "--checkpoint", "1")
    assert step.exit_code == 1 and "holds the checkpoint of step 2 only" in step.stderr


class FakeHfApi:
    """Records the calls fplus makes of huggingface_hub.HfApi (nothing reaches a hub)."""

    calls: list[tuple[str, tuple, dict]] = []

    def create_repo(self, *args, **kwargs):
        self.calls.append(("create_repo", args, kwargs))
        return f"https://huggingface.co/{args[0]}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", (), kwargs))
        files = sorted(str(p.relative_to(kwargs["folder_path"])) for p in Path(kwargs["folder_path"]).rglob("*"))
        self.calls.append(("files", (), {"files": files}))

        class Commit:
            commit_url = f"https://huggingface.co/{kwargs['repo_id']}/commit/abc123"

        return Commit()


def test_push_to_hub_creates_the_repo_and_uploads_the_folder(runs, tmp_path, monkeypatch):
    import huggingface_hub

    _, dirs = runs
    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    out = tmp_path / "model"
    result = run_cli("export", dirs["E0"], out, "--push-to-hub", "someone/fplus-e0", "--private")
    assert result.exit_code == 0, result.stderr
    assert "pushed" in result.stdout and "https://huggingface.co/someone/fplus-e0/commit/abc123" in result.stdout
    (create, args, kwargs), (upload, _, up), (_, _, listed) = FakeHfApi.calls
    assert create == "create_repo" and args == ("someone/fplus-e0",)
    assert kwargs == {"repo_type": "model", "private": True, "exist_ok": True}
    assert upload == "upload_folder" and up["repo_id"] == "someone/fplus-e0" and up["folder_path"] == str(out)
    assert up["repo_type"] == "model" and up["ignore_patterns"] == ["eval/**"]
    assert up["commit_message"] == "fplus export of E0 (E0, step 2)"
    assert {"README.md", MARKER, "policy.safetensors", "processor"} <= set(listed["files"])
    bad = run_cli("export", dirs["E0"], tmp_path / "m2", "--private")
    assert bad.exit_code == 1 and "--private applies to the hub repo of --push-to-hub" in bad.stderr
    monkeypatch.undo()  # the real HfApi, offline (HF_HUB_OFFLINE=1): one line, and the folder stays whole
    offline = run_cli("export", dirs["E0"], tmp_path / "m3", "--push-to-hub", "someone/fplus-e0")
    assert offline.exit_code == 1 and offline.stderr.count("\n") == 1
    assert offline.stderr.startswith(f"error: cannot push {tmp_path / 'm3'} to the hub model repo 'someone/fplus-e0' (")
    assert "offline mode is enabled" in offline.stderr and verify_folder(tmp_path / "m3")["step"] == 2
