"""FSDP2 with 2 CPU processes (gloo), launched as on GPUs: `accelerate launch --config_file
profiles/accelerate/fsdp.yaml --num_processes 2 -m fplus.cli.main train`, against one process that sees the same
samples (the settings and the reasons the runs must agree are test_ddp's: SAME_SAMPLES, 2 x B = 1 x 2B).

On CPU accelerate would run that config as plain DDP (fplus.train.distributed.make_accelerator switches it to
accelerate's FSDP2 path); a checkpoint whose trainer.pt has `optimizer_format` "fsdp2-full" was saved by a sharded
model, so each test first asserts that the run really was sharded.

What is compared: step by step the logged loss (the mean over the processes), grad_norm and the learning rates; the
validation MSE; the checkpoint's weights (the same keys and shapes as the one-process checkpoint, each tensor within
test_ddp's per-learning-rate-group tolerance) and its optimiser state (full shapes: gathered); the FSDP checkpoint
evaluated offline in one process (`fplus eval`'s evaluate_run) against the sharded run's own validation; a run
stopped by SIGTERM at step 3 and resumed under FSDP against the uninterrupted FSDP run (bit for bit).
"""

import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fplus import checkpoint as ckpt
from fplus.errors import CheckpointError
from fplus.settings import Settings, settings_to_environ, settings_to_flat
from fplus.train.distributed import FSDP_OPTIMIZER_FORMAT
from tests.helpers import toy_settings
from tests.train.test_ddp import METRIC_RTOL, SAME_SAMPLES, STEPS, WEIGHT_FRACTION_OF_LR_STEPS, B, lines, weights

REPO = Path(__file__).resolve().parents[2]
FSDP_CONFIG = REPO / "profiles" / "accelerate" / "fsdp.yaml"

SIGTERM_AT_STEP_3 = """
import os, signal, sys
from fplus.model.policy import FPlusPolicy
original, count = FPlusPolicy.losses, {"n": 0}
def losses(self, batch, *args, **kwargs):
    terms, metrics = original(self, batch, *args, **kwargs)
    if self.training:
        count["n"] += 1
        if count["n"] == 3 and os.environ["RANK"] == "0":
            os.kill(os.getpid(), signal.SIGTERM)  # finish step 3, save it, exit 143 (every process)
    return terms, metrics
FPlusPolicy.losses = losses
from fplus.cli.main import main
main()
"""


def weight_tolerance(settings: Settings) -> tuple[dict[str, float], Callable[[str], str]]:
    """test_ddp's per-learning-rate-group tolerance: {group prefix: 1% of what STEPS steps at its lr can move an
    element} and key -> group ("vlm.", "prophet.", "" for the heads, rows and norms)."""
    flat = settings_to_flat(settings)
    lr = {"vlm.": float(flat["LR_BACKBONE"]), "prophet.": float(flat["LR_PROPHET"]), "": float(flat["LR_HEADS"])}
    return ({g: WEIGHT_FRACTION_OF_LR_STEPS * rate * STEPS for g, rate in lr.items()},
            lambda key: next(g for g in lr if key.startswith(g)))


def launch_fsdp(settings: Settings, cwd: Path, *args: str, script: Path | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch` with the FSDP config on 2 CPU processes: `fplus train ARGS` (or `script train ARGS`)."""
    env = {k: v for k, v in os.environ.items() if k != "FPLUS_PROFILE"}
    env.update(settings_to_environ(settings))
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    target = [str(script)] if script else ["-m", "fplus.cli.main"]
    return subprocess.run([accelerate, "launch", "--config_file", str(FSDP_CONFIG), "--num_processes", "2",
                           "--main_process_port", "0", *target, "train", *args],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def assert_sharded(checkpoint: Path) -> dict:
    """The checkpoint was saved by an FSDP2-sharded model (not DDP); returns its trainer.pt."""
    trainer = torch.load(checkpoint / "trainer.pt", weights_only=False)
    assert trainer["optimizer_format"] == FSDP_OPTIMIZER_FORMAT, "the run was not sharded"
    return trainer


def fsdp_settings(toy: Path, out: Path) -> Settings:
    return toy_settings(toy, toy / "ds", OUTPUT_DIR=out, BATCH_SIZE=B, **SAME_SAMPLES)


@pytest.fixture(scope="module")
def fsdp_run(toy, tmp_path_factory) -> Path:
    """An uninterrupted FSDP run (2 processes x BATCH_SIZE B, the run directory)."""
    root = tmp_path_factory.mktemp("fsdp")
    out = launch_fsdp(fsdp_settings(toy, root / "runs"), root)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "runs" / "E2"


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_process_and_save_a_full_checkpoint(toy, tmp_path, fsdp_run):
    from fplus.eval.offline import evaluate_run
    from fplus.train.run import train_run

    single = toy_settings(toy, toy / "ds", OUTPUT_DIR=tmp_path / "one", BATCH_SIZE=2 * B, **SAME_SAMPLES)
    run_one = tmp_path / "one" / "E2"
    train_run(single, run_one, progress_bar=False)
    last = ckpt.latest_valid(fsdp_run)
    assert (fsdp_run / "COMPLETE").is_file() and last.name == f"step-{STEPS:06d}"
    trainer = assert_sharded(last)

    # step by step: the loss (mean over the processes), the norm of the reduced gradient, the learning rates
    train_fsdp, train_one = lines(fsdp_run, "train"), lines(run_one, "train")
    assert [r["step"] for r in train_fsdp] == [r["step"] for r in train_one] == list(range(1, STEPS + 1))
    for a, b in zip(train_fsdp, train_one, strict=True):
        for term in ("loss", "l_action"):  # means over both processes' samples (as in test_ddp)
            assert a[term] == pytest.approx(b[term], rel=METRIC_RTOL), (a["step"], term)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=METRIC_RTOL), a["step"]
        assert {k: v for k, v in a.items() if k.startswith("lr_")} == \
            {k: v for k, v in b.items() if k.startswith("lr_")}
    val_fsdp, val_one = lines(fsdp_run, "val")[-1], lines(run_one, "val")[-1]
    assert val_fsdp["step"] == val_one["step"] == STEPS
    assert val_fsdp["val_mse_none"] == pytest.approx(val_one["val_mse_none"], rel=METRIC_RTOL)

    # the checkpoint is a full one: a one-process checkpoint's keys and shapes, each weight within tolerance
    final_fsdp, final_one = weights(last), weights(ckpt.latest_valid(run_one))
    assert final_fsdp.keys() == final_one.keys()
    assert {k: v.shape for k, v in final_fsdp.items()} == {k: v.shape for k, v in final_one.items()}
    tolerance, group_of = weight_tolerance(single)
    worst = {k: (final_fsdp[k] - final_one[k]).abs().max().item() for k in final_one}
    too_far = {k: (d, tolerance[group_of(k)]) for k, d in worst.items() if d > tolerance[group_of(k)]}
    assert not too_far, too_far
    # ... and so is its optimiser state: every trained weight's moments, unsharded, by parameter name
    moments = trainer["optimizer"]["state"]
    trained = {k for k in final_one if k in moments}
    assert len(trained) > 0.9 * len(final_one)  # all but the normalisers' buffers
    for name in trained:
        assert moments[name]["exp_avg"].shape == moments[name]["exp_avg_sq"].shape == final_one[name].shape, name

    # evaluated offline in one process, the gathered weights give the sharded run's own validation
    offline_fsdp, _ = evaluate_run(fsdp_run, ("none",), device="cpu")
    offline_one, _ = evaluate_run(run_one, ("none",), device="cpu")
    assert offline_fsdp["modes"]["none"]["mse_norm"] == pytest.approx(val_fsdp["val_mse_none"], rel=METRIC_RTOL)
    assert offline_fsdp["modes"]["none"]["mse_norm"] == pytest.approx(offline_one["modes"]["none"]["mse_norm"],
                                                                      rel=METRIC_RTOL)


@pytest.mark.slow
def test_fsdp_stopped_and_resumed_run_ends_equal_to_the_uninterrupted_one(toy, tmp_path, fsdp_run):
    from fplus.train.recipe import TrainRecipe

    settings = fsdp_settings(toy, tmp_path / "runs")
    run_dir = tmp_path / "runs" / "E2"
    script = tmp_path / "sigterm.py"
    script.write_text(SIGTERM_AT_STEP_3)
    stopped = launch_fsdp(settings, tmp_path, script=script)
    text = " ".join((stopped.stdout + stopped.stderr).split())
    assert stopped.returncode != 0
    assert f"SIGTERM: stopped {run_dir} at step 3 of {STEPS}, checkpoint saved (step-000003)" in text, text[-3000:]
    assert_sharded(ckpt.latest_valid(run_dir))

    # one process cannot resume what two saved (each process's random state and data position)
    recipe = TrainRecipe(settings, run_dir, resume=True)
    with pytest.raises(CheckpointError, match=r"step-000003 was written by 2 process\(es\) and this run has 1; "
                                              "resume with the same number of processes"):
        recipe.setup()
    recipe.close()

    resumed = launch_fsdp(settings, tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run_dir / "COMPLETE").is_file()
    final, straight = weights(ckpt.latest_valid(run_dir)), weights(ckpt.latest_valid(fsdp_run))
    assert final.keys() == straight.keys()
    assert [k for k in straight if not torch.equal(final[k], straight[k])] == []
    assert [r["step"] for r in lines(run_dir, "train")] == list(range(1, STEPS + 1))
    for a, b in zip(lines(run_dir, "train"), lines(fsdp_run, "train"), strict=True):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"]), a["step"]
    assert lines(run_dir, "val")[-1]["val_mse_none"] == lines(fsdp_run, "val")[-1]["val_mse_none"]


# ----- the pieces, in one process -----------------------------------------------------------------------------

def test_deepspeed_settings_fill_the_auto_values_and_refuse_others():
    from fplus.errors import ConfigError
    from fplus.train.distributed import deepspeed_settings

    config = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}
    assert deepspeed_settings(config, 6, 0.5) == {"train_micro_batch_size_per_gpu": 6, "gradient_clipping": 0.5,
                                                  "zero_optimization": {"stage": 2}}
    with pytest.raises(ConfigError, match="the DeepSpeed config sets gradient_clipping 1.0 but MAX_GRAD_NORM is 0.5: "
                                          "remove gradient_clipping from the config"):
        deepspeed_settings({"gradient_clipping": 1.0}, 6, 0.5)


def test_resume_refuses_an_optimizer_state_of_another_sharding(tmp_path):
    from accelerate import Accelerator

    from fplus.train.distributed import load_optimizer

    acc = Accelerator(cpu=True)  # one process: not sharded
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(CheckpointError, match=r"trainer.pt was saved under FSDP2 \(profiles/accelerate/fsdp.yaml\) "
                                              "and this run trains without FSDP: resume it with the accelerate "
                                              "config it was trained with"):
        load_optimizer(acc, torch.nn.Linear(2, 2), optimizer, {"optimizer_format": FSDP_OPTIMIZER_FORMAT,
                                                                "optimizer": {}}, tmp_path)


def test_a_checkpoint_of_the_0d_gate_loads_into_the_1_element_gate(tmp_path):
    """fully_shard refuses 0-d parameters, so the injection gate has one element; a checkpoint written while it
    was 0-d still loads (and a weight of another shape is refused, naming it)."""
    import numpy as np
    from safetensors.torch import load_file, save_file

    from fplus.model.policy import HEADS_FILE, FPlusPolicy
    from tests.helpers import policy_config

    stats = {"action": {"mean": np.zeros(2), "std": np.ones(2)}}
    config = policy_config(backbone="tiny", action_dim=2, action_horizon=2, image_size=64, world_dim=8,
                           prophet=True, injection=True)
    policy = FPlusPolicy.build(config, stats, "action", None)
    assert tuple(policy.injection.gate.shape) == (1,)
    with torch.no_grad():
        policy.injection.gate.fill_(0.25)
    directory = policy.save(tmp_path / "policy")
    own = load_file(str(directory / HEADS_FILE))
    save_file({**own, "injection.gate": own["injection.gate"].reshape(())}, str(directory / HEADS_FILE))
    fresh = FPlusPolicy.build(config, stats, "action", None)
    fresh.load_weights(directory)
    assert torch.equal(fresh.injection.gate, torch.full((1,), 0.25))

    save_file({**own, "action_head.step": torch.zeros(3, 1)}, str(directory / HEADS_FILE))
    with pytest.raises(CheckpointError, match=r"holds weights of other shapes than the config's: "
                                              r"\['action_head.step \(3, 1\) \(expected \(2, 64\)\)'\]"):
        fresh.load_weights(directory)


@pytest.mark.slow
def test_fsdp_runs_the_two_passes_of_a_coc_fraction_batch(toy, tmp_path):
    """E4 with COC_FRACTION=0.5: each process's step runs its CoC sample and its other sample as two backbone
    passes through the same sharded layers (PromptBatch.rest); FSDP2 must unshard for both and reduce once."""
    from tests.train.test_host_syncs import coc_file

    s = toy_settings(toy, toy / "ds", OUTPUT_DIR=tmp_path / "runs", BATCH_SIZE=B,
                     COC_JSONL=coc_file(tmp_path / "coc.jsonl"), COC_FRACTION=0.5,
                     **{**SAME_SAMPLES, "EXPERIMENT": "E4"})
    out = launch_fsdp(s, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "E4"
    assert_sharded(ckpt.latest_valid(run))
    train = lines(run, "train")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for r in train:
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("l_text", "l_align", "l_action", "grad_norm")), r
