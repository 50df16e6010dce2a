import json

import pytest
import torch

from fplus import checkpoint as ckpt
from fplus.eval.offline import evaluate_run
from fplus.model.corruption import MODES
from fplus.rundir import run_dir_for
from fplus.train.recipe import TrainRecipe
from fplus.train.run import train_run
from fplus.train.validation import evaluate_modes
from tests.helpers import compute_toy_latents, run_cli, toy_settings, write_toy_dataset


@pytest.fixture(scope="module")
def e2_run(tmp_path_factory):
    from accelerate.state import AcceleratorState, PartialState

    root = tmp_path_factory.mktemp("e2")
    write_toy_dataset(root / "ds")
    s = toy_settings(root, root / "ds", EXPERIMENT="E2", MAX_STEPS=6, VAL_FRACTION=0.4)
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
    closed = evaluate_modes(policy, recipe.val_set, MODES, batch_size=4)["modes"]
    assert len({r["mse_norm"] for m, r in closed.items() if m != "shuffle"}) == 1
    # shuffle leaves out the samples that could only get a memory of their own episode (a batch where one
    # episode holds more than half): with the gate closed it scores `none` on the samples it kept
    if closed["shuffle"]["samples"] == closed["none"]["samples"]:
        assert closed["shuffle"]["mse_norm"] == closed["none"]["mse_norm"]
    with torch.no_grad():
        policy.injection.gate.fill_(1.0)
    evaluated = evaluate_modes(policy, recipe.val_set, MODES, batch_size=4)
    opened = evaluated["modes"]
    for mode in ("oracle", "zero", "random", "shuffle", "history"):
        assert opened[mode]["mse_norm"] != opened["none"]["mse_norm"], mode
    assert opened["none"]["cos_world"] == pytest.approx(closed["none"]["cos_world"])
    assert opened["none"]["samples"] == len(recipe.val_set)
    assert opened["shuffle"]["samples"] > 0.3 * len(recipe.val_set)  # 2 val episodes: a 3-1 batch keeps only 2
    world = evaluated["world"]
    assert world["mean"] == 0.0 and world["prophet"] == opened["none"]["cos_world"]
    # the world cosines are the Prophet's and the baselines' over every valid future step of the val samples
    from fplus.model.prophet import world_cosine_sums

    sums = {k: [0.0, 0.0] for k in ("prophet", "copy", "copy_raw")}
    for i in range(len(recipe.val_set)):
        sample = recipe.val_set[i]
        batch = {k: (v[None] if torch.is_tensor(v) else [v]) for k, v in sample.items()}
        with torch.no_grad():
            enc = policy.encode(policy.processor(batch), with_coc=False)
        copy = enc.z_hist[:, -1:].expand_as(enc.z_future)
        raw = policy.latent_norm.inverse
        for key, (pred, target) in {"prophet": (enc.z_pred, enc.z_future), "copy": (copy, enc.z_future),
                                    "copy_raw": (raw(copy), raw(enc.z_future))}.items():
            t, c = world_cosine_sums(pred, target, enc.future_valid)
            sums[key][0] += float(t)
            sums[key][1] += float(c)
    for key, (t, c) in sums.items():  # samples at an episode's end without a valid future do not count
        assert world[key] == pytest.approx(t / c, abs=1e-5), key


def test_e0_is_evaluated_without_corruption_only(tmp_path):
    from accelerate.state import AcceleratorState, PartialState

    write_toy_dataset(tmp_path / "ds")
    s = toy_settings(tmp_path, tmp_path / "ds", EXPERIMENT="E0", MAX_STEPS=2)
    train_run(s, run_dir_for(s), progress_bar=False)
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    result, _ = evaluate_run(run_dir_for(s), MODES)
    assert list(result["modes"]) == ["none"] and result["world"] is None


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


def test_cli_prints_one_table_with_all_six_modes(e2_run):
    _, run_dir = e2_run
    out = run_cli("eval", run_dir, "--corruption", "all")
    assert out.exit_code == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("│")]
    assert [r.split("│")[1].strip() for r in rows] == list(MODES)
    assert ckpt.latest_valid(run_dir).name == "step-000006"


def test_evaluating_one_mode_keeps_the_others_in_the_file(e2_run):
    _, run_dir = e2_run
    evaluate_run(run_dir, MODES)
    result, path = evaluate_run(run_dir, ("oracle",))
    assert list(json.loads(path.read_text())["modes"]) == list(MODES)
    assert list(result["modes"]) == list(MODES)
