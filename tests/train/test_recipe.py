"""The training loop: exact resume, checkpoint safety, metrics, experiment checks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fplus import checkpoint as ckpt
from fplus.errors import FplusError
from fplus.model.corruption import MODES
from fplus.rundir import METRICS, run_dir_for, run_state, settings_from_run
from fplus.train.recipe import TrainRecipe
from fplus.train.run import train_run
from fplus.train.state import lr_lambda, p_oracle_at
from tests.helpers import toy_settings, write_toy_dataset


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    last = ckpt.latest_valid(run_dir)
    return {**load_file(str(last / "policy/policy.safetensors")),
            **load_file(str(last / "policy/backbone_trainable.safetensors"))}


def metrics(run_dir: Path, kind: str) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / METRICS).read_text().splitlines()]
    return [x for x in lines if x["kind"] == kind]


def test_schedules():
    f = lr_lambda(warmup=4, total=20, min_ratio=0.1)
    assert [round(f(s), 3) for s in (0, 3)] == [0.25, 1.0]
    assert f(20) == pytest.approx(0.1) and f(12) == pytest.approx(0.55)
    assert p_oracle_at(0, 11, 0.9, 0.1) == pytest.approx(0.9) and p_oracle_at(10, 11, 0.9, 0.1) == pytest.approx(0.1)


def test_killed_and_resumed_run_ends_with_the_same_weights(toy, tmp_path):
    common = dict(EXPERIMENT="E2", MAX_STEPS=7, SAVE_EVERY=2, GRAD_ACCUM=2, BATCH_SIZE=2, KEEP_LAST=2)
    straight = toy_settings(toy, toy / "ds", OUTPUT_DIR=tmp_path / "a", **common)
    train_run(straight, run_dir_for(straight), progress_bar=False)

    resumed = toy_settings(toy, toy / "ds", OUTPUT_DIR=tmp_path / "b", **common)
    run_dir = run_dir_for(resumed)
    progress = train_run(resumed, run_dir, stop_after=5, progress_bar=False)  # "killed" after step 5 (ckpt at 4)
    assert progress.step == 5 and run_state(run_dir) == "partial"
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step-000002", "step-000004"]
    from accelerate.state import AcceleratorState, PartialState
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    final = train_run(resumed, run_dir, resume=True, progress_bar=False)
    assert final.step == 7 and run_state(run_dir) == "complete"

    a, b = weights(run_dir_for(straight)), weights(run_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [m["step"] for m in metrics(run_dir, "train")]
    assert steps == list(range(1, 8)), "metric lines of the lost step 5 are not duplicated"


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(toy, tmp_path, capsys):
    s = toy_settings(toy, toy / "ds", OUTPUT_DIR=tmp_path, EXPERIMENT="E0", MAX_STEPS=6, SAVE_EVERY=2)
    run_dir = run_dir_for(s)
    train_run(s, run_dir, stop_after=5, progress_bar=False)
    newest = ckpt.list_checkpoints(run_dir)[-1]
    assert newest.name == "step-000004"
    weights_file = newest / "policy/policy.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-10])  # truncated on disk
    assert "does not match" in ckpt.verify(newest)
    (ckpt.checkpoint_dir(run_dir) / ".tmp-step-000006").mkdir()  # a half-written checkpoint is ignored
    assert ckpt.latest_valid(run_dir, warn=lambda m: None).name == "step-000002"
    from rich.console import Console
    recipe = TrainRecipe(s, run_dir, resume=True, console=Console(force_terminal=False))
    recipe.setup()
    assert recipe.progress.step == 2
    assert "step-000004 is unusable" in capsys.readouterr().out


def test_gate_moves_and_world_loss_decreases_in_e2(toy, tmp_path):
    s = toy_settings(toy, toy / "ds", OUTPUT_DIR=tmp_path, EXPERIMENT="E2", MAX_EPOCHS=3, VAL_FRACTION=0.4)
    run_dir = run_dir_for(s)
    train_run(s, run_dir, progress_bar=False)
    train = metrics(run_dir, "train")
    assert abs(train[-1]["gate"]) > 1e-4
    first, last = train[0]["l_world"], sum(m["l_world"] for m in train[-3:]) / 3
    assert last < 0.7 * first  # standardised targets: a constant predictor scores L_world = 1 (cos 0)
    val = metrics(run_dir, "val")
    assert len(val) == 3
    assert {f"val_mse_{m}" for m in MODES} <= set(val[-1])
    assert set(train[-1]) >= {"loss", "l_action", "l_world", "cos_world", "gate", "lr_backbone", "lr_heads",
                              "lr_prophet", "samples_per_s", "p_oracle"}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["settings"]["EXPERIMENT"] == "E2" and config["policy"]["model"]["injection"]
    assert settings_from_run(run_dir).model.injection
    # the Prophet's world cosine is logged beside its two trivial baselines, in both latent spaces
    world = ("val_cos_world", "val_cos_world_mean", "val_cos_world_copy", "val_cos_world_raw",
             "val_cos_world_mean_raw", "val_cos_world_copy_raw")
    assert set(world) <= set(val[-1])
    assert val[-1]["val_cos_world_mean"] == 0.0  # the training mean is the origin of the standardised space
    assert val[-1]["val_cos_world_copy"] > 0.2  # the toy's square moves slowly: the present is informative
    # the run's latent statistics are those of its training frames
    stats = json.loads((run_dir / "latent_stats.json").read_text())
    from fplus.data.lerobot import LeRobotDataset
    from fplus.data.split import Split
    from fplus.world.cache import find_latents

    ds = LeRobotDataset.open(toy / "ds")
    _, z = find_latents(s.world.cache_dir, ds, s.data.image_key, "dino", "tiny", "cls", 8)
    train_eps = Split.load(run_dir / "split.json").train
    rows = [r for e in train_eps for r in range(ds.episode(e).start, ds.episode(e).stop)]
    expected = torch.from_numpy(z[rows].astype("float64"))
    torch.testing.assert_close(torch.tensor(stats["mean"], dtype=torch.float64), expected.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(stats["std"], dtype=torch.float64), expected.std(0), atol=1e-5, rtol=1e-4)


def test_e0_validates_only_without_corruption_and_val_every_sets_the_points(toy, tmp_path):
    s = toy_settings(toy, toy / "ds", OUTPUT_DIR=tmp_path, EXPERIMENT="E0", MAX_STEPS=6, VAL_EVERY=2,
                     BATCH_SIZE=2)
    run_dir = run_dir_for(s)
    train_run(s, run_dir, progress_bar=False)
    val = metrics(run_dir, "val")
    assert [v["step"] for v in val] == [2, 4, 6]
    assert all(not any(k.startswith("val_mse_") and k != "val_mse_none" for k in v) for v in val)
    assert "val_cos_world" not in val[-1] and "val_l_text" not in val[-1]


def test_coc_validation_scores_every_sample_beside_its_unigram_baseline(toy, tmp_path):
    """E3 with COC_FRACTION=0.5: val_l_text scores the CoC text of every validation sample (what evaluate_modes
    computes alone), next to the unigram baseline; E0 validation has neither."""
    from fplus.train.validation import evaluate_modes, unigram_text_baseline
    from tests.train.test_host_syncs import coc_file

    s = toy_settings(toy, toy / "ds", OUTPUT_DIR=tmp_path, EXPERIMENT="E3", MAX_STEPS=2, VAL_EVERY=2, BATCH_SIZE=2,
                     COC_FRACTION=0.5, COC_JSONL=coc_file(tmp_path / "coc.jsonl"))
    recipe = TrainRecipe(s, run_dir_for(s), progress_bar=False)
    recipe.setup()
    recipe.fit()
    val = metrics(run_dir_for(s), "val")[-1]
    policy = recipe.accelerator.unwrap_model(recipe.model)
    alone = evaluate_modes(policy, recipe.val_set, ("none",), s.train.batch_size)
    assert val["val_l_text"] == pytest.approx(alone["text"]["l_text"], rel=1e-6) and val["val_l_text"] > 0
    vocab = policy.vlm.get_output_embeddings().out_features
    assert val["val_l_text_unigram"] == unigram_text_baseline(policy.processor.builder.label_ids, vocab,
                                                              recipe.train_set, recipe.val_set)
    assert 0 < val["val_l_text_unigram"] < 6  # the labels use a few of the tiny vocabulary's ids (ln 413 = 6.0)


def test_e4_without_coc_fails_clearly(toy, tmp_path):
    s = toy_settings(toy, toy / "ds", OUTPUT_DIR=tmp_path, EXPERIMENT="E4")
    with pytest.raises(FplusError, match="COC_JSONL is not set.*fplus coc generate"):
        TrainRecipe(s, run_dir_for(s)).setup()


def test_missing_latents_say_how_to_make_them(tmp_path):
    write_toy_dataset(tmp_path / "ds", lengths=(6, 6))
    s = toy_settings(tmp_path, tmp_path / "ds", EXPERIMENT="E2")
    with pytest.raises(FplusError, match="compute them first: fplus latents"):
        TrainRecipe(s, run_dir_for(s)).setup()


def test_existing_run_needs_resume(toy, tmp_path):
    s = toy_settings(toy, toy / "ds", OUTPUT_DIR=tmp_path, EXPERIMENT="E0", MAX_STEPS=1)
    train_run(s, run_dir_for(s), progress_bar=False)
    with pytest.raises(FplusError, match="already holds a run; pass --resume"):
        TrainRecipe(s, run_dir_for(s))


KILL = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from tests.helpers import toy_settings
from fplus.rundir import run_dir_for
from fplus.train.run import train_run
root = Path(sys.argv[1])
s = toy_settings(root, root / "ds", OUTPUT_DIR=sys.argv[2], EXPERIMENT="E2", MAX_STEPS=12, SAVE_EVERY=1,
                 BATCH_SIZE=2)
train_run(s, run_dir_for(s), resume=sys.argv[4] == "resume", progress_bar=False)
"""


def test_sigkill_mid_run_then_resume_matches(toy, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(KILL)
    repo = str(Path(__file__).resolve().parents[2])
    straight = subprocess.run([sys.executable, str(script), str(toy), str(tmp_path / "a"), repo, "new"],
                              capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-2000:]
    proc = subprocess.Popen([sys.executable, str(script), str(toy), str(tmp_path / "b"), repo, "new"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "b" / "E2"
    deadline = time.time() + 120
    while time.time() < deadline and len(ckpt.list_checkpoints(run_dir)) < 2:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.list_checkpoints(run_dir), "no checkpoint before the kill"
    assert run_state(run_dir) == "partial"
    resumed = subprocess.run([sys.executable, str(script), str(toy), str(tmp_path / "b"), repo, "resume"],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = weights(tmp_path / "a" / "E2"), weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_logger_option_fails_clearly_when_its_package_is_missing(toy, tmp_path):
    pytest.importorskip("torch")
    try:
        import tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    s = toy_settings(toy, toy / "ds", OUTPUT_DIR=tmp_path, EXPERIMENT="E0", LOGGER="tensorboard")
    with pytest.raises(FplusError, match="LOGGER=tensorboard needs the tensorboard package"):
        TrainRecipe(s, run_dir_for(s)).setup()
