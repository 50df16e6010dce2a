"""The training loop with 2 CPU processes (gloo DDP), launched by torchrun (the launcher `accelerate launch` runs
for multi-GPU configs; its own multi-CPU mode needs MPI), against one process that sees the same samples.

Why the two runs must agree: EpochSampler gives process r of W the positions r, r+W, ... of the epoch's permutation,
so at step k the 2 processes x BATCH_SIZE b see exactly the samples perm[2bk : 2bk+2b] that 1 process x BATCH_SIZE 2b
sees. DDP averages the two processes' gradients, and each process's loss is a mean over its own b samples, so the
average is the gradient of the mean over all 2b samples as long as both halves hold the same number of loss
elements and nothing is drawn at random per process. The settings make that exact:
- ACTION_HORIZON=1: no action step is ever padded (masked_mse divides by the valid steps of its own batch);
- LAMBDA_WORLD=0: L_world (a mean over the valid future steps, fewer at episode ends) puts no gradient anywhere;
- P_ORACLE_START=P_ORACLE_END=0: the memory is always the Prophet's prediction, no per-process draw.
E2 keeps the Prophet (its context path) and the gated injection in the DDP graph. Gradient clipping (the norm of
the averaged gradient), AdamW and the schedule then act on the same numbers.

What is compared: metrics.jsonl is written by process 0, with each metric averaged over the processes at logging
steps (each holds the mean over its own half batch, and the halves hold equal counts), so the losses, `grad_norm`
(the norm of the all-reduced gradient, before clipping) and the learning rates are compared step by step, as are
the validation MSE of the final weights and the checkpoint's safetensors.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fplus import checkpoint as ckpt
from fplus.settings import settings_to_environ, settings_to_flat
from fplus.train.run import train_run
from tests.helpers import toy_settings

STEPS, B = 4, 2
SAME_SAMPLES = dict(EXPERIMENT="E2", ACTION_HORIZON=1, LAMBDA_WORLD=0, P_ORACLE_START=0, P_ORACLE_END=0,
                    MAX_STEPS=STEPS, SAVE_EVERY=2, KEEP_LAST=2)
# Float rounding only: the all-reduce sums two half-batch means where one process takes one mean, and the shorter
# padded prompts of a half batch change the CPU kernels' blocking (~1e-7 relative per operation; measured: grad
# norms and validation MSE agree to 4e-7 relative). AdamW moves an element by about lr per step (lr * m / (sqrt(v)
# + eps)), but that ratio is sensitive to rounding where a gradient is as small as eps, so the weights are compared
# per learning-rate group: they may differ by 1% of the most that 4 steps can move them (0.01 x lr x 4; measured:
# 1.9e-6 of the allowed 1.2e-4 for the heads, 2.7e-7 of 4e-6 for the backbone), and the last 2 steps of training
# must move every group by more than 10 times that (measured: ~39 times).
WEIGHT_FRACTION_OF_LR_STEPS = 0.01
METRIC_RTOL = 1e-5


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every saved weight of a checkpoint's policy: its own modules, and the backbone's (prefixed `vlm.`)."""
    backbone = load_file(str(checkpoint / "policy/backbone_trainable.safetensors"))
    return {**load_file(str(checkpoint / "policy/policy.safetensors")), **{f"vlm.{k}": v for k, v in backbone.items()}}


def lines(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_on_the_same_samples(toy, tmp_path):
    ddp = toy_settings(toy, toy / "ds", OUTPUT_DIR=tmp_path / "ddp", BATCH_SIZE=B, **SAME_SAMPLES)
    env = {k: v for k, v in os.environ.items() if k not in ("FPLUS_PROFILE",)}
    env.update(settings_to_environ(ddp))
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    out = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "fplus.cli.main", "train"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    single = toy_settings(toy, toy / "ds", OUTPUT_DIR=tmp_path / "one", BATCH_SIZE=2 * B, **SAME_SAMPLES)
    train_run(single, tmp_path / "one" / "E2", progress_bar=False)

    run_ddp, run_one = tmp_path / "ddp" / "E2", tmp_path / "one" / "E2"
    assert (run_ddp / "COMPLETE").is_file()
    last = ckpt.latest_valid(run_ddp)
    assert last.name == f"step-{STEPS:06d}"
    assert (last / "rng-0.pt").is_file() and (last / "rng-1.pt").is_file(), "both processes saved their state"
    r0, r1 = torch.load(last / "rng-0.pt", weights_only=False), torch.load(last / "rng-1.pt", weights_only=False)
    assert not torch.equal(r0["generator"], r1["generator"]), "each process has its own sampling generator"

    # the same schedule, and all steps inside epoch 0 (no sample of the DDP sampler's wrap-around padding is used)
    config_ddp, config_one = (json.loads((r / "config.json").read_text()) for r in (run_ddp, run_one))
    assert config_ddp["total_steps"] == config_one["total_steps"] == STEPS
    assert config_ddp["steps_per_epoch"] == config_one["steps_per_epoch"] >= STEPS
    # step by step, the norm of the (all-reduced) gradient and the learning rates
    train_ddp, train_one = lines(run_ddp, "train"), lines(run_one, "train")
    assert [r["step"] for r in train_ddp] == [r["step"] for r in train_one] == list(range(1, STEPS + 1))
    for a, b in zip(train_ddp, train_one, strict=True):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=METRIC_RTOL), a["step"]
        # the logged losses are means over both processes' samples (each process's mean, averaged at LOG_EVERY)
        for term in ("loss", "l_action"):  # (l_world: a mean over each half's valid future steps, unequal counts)
            assert a[term] == pytest.approx(b[term], rel=METRIC_RTOL), (a["step"], term)
        assert {k: v for k, v in a.items() if k.startswith("lr_")} == \
            {k: v for k, v in b.items() if k.startswith("lr_")}
    assert len({round(r["grad_norm"], 4) for r in train_one}) == STEPS  # the steps see different batches
    # the final weights, every tensor of the checkpoint, within 1% of what 4 steps at the group's lr can move
    flat = settings_to_flat(single)
    lr = {"vlm.": float(flat["LR_BACKBONE"]), "prophet.": float(flat["LR_PROPHET"]), "": float(flat["LR_HEADS"])}
    tolerance = {group: WEIGHT_FRACTION_OF_LR_STEPS * rate * STEPS for group, rate in lr.items()}
    group_of = lambda key: next(g for g in lr if key.startswith(g))  # noqa: E731 ("" last: heads, rows, norms)
    final_ddp, final_one = weights(last), weights(ckpt.latest_valid(run_one))
    assert final_ddp.keys() == final_one.keys()
    worst = {k: (final_ddp[k] - final_one[k]).abs().max().item() for k in final_one}
    too_far = {k: (d, tolerance[group_of(k)]) for k, d in worst.items() if d > tolerance[group_of(k)]}
    assert not too_far, too_far
    # ... a tolerance far below what training moves: steps 3 and 4 change every group by > 10 x its tolerance
    earlier = weights(ckpt.checkpoint_dir(run_one) / "step-000002")
    for group in ("vlm.", "prophet.", "action_head.", "injection.", "token_rows."):
        moved = max((final_one[k] - earlier[k]).abs().max().item() for k in final_one if k.startswith(group))
        assert moved > 10 * tolerance[group_of(group)], (group, moved)
    # the validation of the final weights (the whole validation split in both runs)
    val_ddp, val_one = lines(run_ddp, "val")[-1], lines(run_one, "val")[-1]
    assert val_ddp["step"] == val_one["step"] == STEPS
    assert val_ddp["val_mse_none"] == pytest.approx(val_one["val_mse_none"], rel=METRIC_RTOL)
