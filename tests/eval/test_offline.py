import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fplus.eval.offline import evaluate_modes, evaluate_run
from fplus.model.corruption import MODES
from fplus.train import checkpoint as ckpt
from fplus.train.recipe import TrainRecipe
from fplus.train.run import run_dir_for, train_run
from tests.helpers import compute_toy_latents, toy_settings, write_toy_dataset


@pytest.fixture(scope="module")
def e2_run(tmp_path_factory):
    from accelerate.state import AcceleratorState, PartialState

    root = tmp_path_factory.mktemp("e2")
    write_toy_dataset(root / "ds")
    s = toy_settings(root, root / "ds", EXPERIMENT="E2", MAX_STEPS=6)
    compute_toy_latents(s)
    train_run(s, run_dir_for(s), progress_bar=False)
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    return s, run_dir_for(s)


def test_all_modes_equal_with_a_closed_gate_and_oracle_differs_once_open(e2_run):
    s, run_dir = e2_run
    recipe = TrainRecipe(s, run_dir, resume=True)
    recipe.setup()
    policy = recipe.accelerator.unwrap_model(recipe.model)
    with torch.no_grad():
        policy.injection.gate.zero_()
    closed = evaluate_modes(policy, recipe.val_set, MODES, batch_size=4)
    assert len({r["mse_norm"] for r in closed.values()}) == 1
    with torch.no_grad():
        policy.injection.gate.fill_(1.0)
    opened = evaluate_modes(policy, recipe.val_set, MODES, batch_size=4)
    for mode in ("oracle", "zero", "random", "shuffle"):
        assert opened[mode]["mse_norm"] != opened["none"]["mse_norm"], mode
    assert opened["none"]["cos_world"] == pytest.approx(closed["none"]["cos_world"])
    assert opened["none"]["samples"] == len(recipe.val_set)


def test_evaluate_run_writes_all_modes_from_the_runs_own_config(e2_run, monkeypatch):
    _, run_dir = e2_run
    monkeypatch.setenv("BACKBONE", "qwen3-vl-2b")  # the current environment must not matter
    result, path = evaluate_run(run_dir, MODES)
    assert path == run_dir / "eval" / "offline-step-000006.json"
    saved = json.loads(path.read_text())
    assert list(saved["modes"]) == list(MODES) and saved["step"] == 6 and saved["experiment"] == "E2"
    m = saved["modes"]["none"]
    assert len(m["mse_per_dim_raw"]) == 2 and m["mse_raw"] == pytest.approx(sum(m["mse_per_dim_raw"]) / 2)
    with pytest.raises(Exception, match="no checkpoint at step 3.*available steps: \\[6\\]"):
        evaluate_run(run_dir, ("none",), step=3)


def test_cli_prints_one_table_with_all_five_modes(e2_run):
    _, run_dir = e2_run
    fplus = str(Path(sys.executable).with_name("fplus"))
    out = subprocess.run([fplus, "eval", str(run_dir), "--corruption", "all"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"}, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("│")]
    assert [r.split("│")[1].strip() for r in rows] == list(MODES)
    assert ckpt.latest_valid(run_dir).name == "step-000006"


def test_evaluating_one_mode_keeps_the_others_in_the_file(e2_run):
    _, run_dir = e2_run
    evaluate_run(run_dir, MODES)
    result, path = evaluate_run(run_dir, ("oracle",))
    assert list(json.loads(path.read_text())["modes"]) == list(MODES)
    assert list(result["modes"]) == list(MODES)
