"""Training on a dataset mixture: latents per member, the weighted epoch, exact resume, and the run's records of each
member (config.json, split.json) checked when the run is resumed or reopened."""

import json
import shutil

import numpy as np
import pytest
import torch

from fplus.data.lerobot import LeRobotDataset
from fplus.data.mixture import MixtureDataset
from fplus.data.split import Split, split_episodes
from fplus.deploy.loader import open_run
from fplus.errors import DataError
from fplus.rundir import CONFIG, SPLIT, load_run, run_dir_for, run_state
from fplus.train.data import WeightedEpochSampler
from fplus.train.recipe import TrainRecipe
from fplus.train.run import train_run
from fplus.world.cache import find_dataset_latents, find_latents
from tests.helpers import CAM, compute_toy_latents, reset_accelerate, run_cli, toy_settings, write_toy_dataset
from tests.train.test_recipe import weights


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    """Two toy datasets (5 and 3 episodes) with their tiny-DINO latents, each in its own cache entry."""
    root = tmp_path_factory.mktemp("mixture")
    write_toy_dataset(root / "a")
    write_toy_dataset(root / "b", lengths=(8, 14, 10), seed=1)
    for name in ("a", "b"):
        compute_toy_latents(toy_settings(root, root / name))
    return root


@pytest.mark.slow
def test_killed_and_resumed_mixture_run_ends_with_the_same_weights(mix, tmp_path):
    spec = f"{mix / 'a'}:0.7,{mix / 'b'}:0.3"
    common = dict(DATASET=spec, EXPERIMENT="E2", MAX_STEPS=7, SAVE_EVERY=2, GRAD_ACCUM=2, BATCH_SIZE=2, KEEP_LAST=2,
                  VAL_BATCHES=1)
    straight = toy_settings(mix, mix / "a", OUTPUT_DIR=tmp_path / "a", **common)
    train_run(straight, run_dir_for(straight), progress_bar=False)

    resumed = toy_settings(mix, mix / "a", OUTPUT_DIR=tmp_path / "b", **common)
    run_dir = run_dir_for(resumed)
    progress = train_run(resumed, run_dir, stop_after=5, progress_bar=False)  # "killed" after step 5 (ckpt at 4)
    assert progress.step == 5 and 0 < progress.position and run_state(run_dir) == "partial"  # mid-epoch
    reset_accelerate()
    assert train_run(resumed, run_dir, resume=True, progress_bar=False).step == 7
    a, b = weights(run_dir_for(straight)), weights(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    config = json.loads((run_dir / CONFIG).read_text())
    members = config["dataset_members"]
    fingerprints = [LeRobotDataset.open(mix / n).fingerprint for n in ("a", "b")]
    assert [(m["dataset"], m["weight"], m["fingerprint"]) for m in members] == [
        (str(mix / "a"), 0.7, fingerprints[0]), (str(mix / "b"), 0.3, fingerprints[1])]
    split = Split.load(run_dir / SPLIT)
    assert [(m.train, m.val) for m in split.members] == [
        (s.train, s.val) for s in (split_episodes(range(5), 0.2, 0), split_episodes(range(3), 0.2, 0))]
    assert split.val == (*split.members[0].val, *(5 + e for e in split.members[1].val))


def test_the_training_epoch_follows_the_weights_and_two_runs_draw_the_same_batches(mix, tmp_path):
    spec = f"{mix / 'a'}:0.1,{mix / 'b'}:0.9"  # b has fewer frames but 9x the weight
    recipes = []
    for name in ("one", "two"):
        reset_accelerate()
        r = TrainRecipe(toy_settings(mix, mix / "a", DATASET=spec, EXPERIMENT="E0", OUTPUT_DIR=tmp_path / name),
                        tmp_path / name / "E0", progress_bar=False)
        r.setup()
        recipes.append(r)
    r = recipes[0]
    assert isinstance(r.ds, MixtureDataset)
    sampler = r._sampler(0)
    assert isinstance(sampler, WeightedEpochSampler)
    order = np.array(list(sampler))
    members = r.ds.member_of_rows(r.train_set.rows[order])
    n = len(r.train_set)
    assert len(order) == n and np.bincount(members).tolist() == [round(0.1 * n), n - round(0.1 * n)]
    def first_batches(x, k=3):  # epoch 1 resumed at its 5th sample, as `fit` builds the loader
        it = iter(x._loader(x.train_set, x._sampler(1, start=4)))
        return [next(it) for _ in range(k)]

    one, two = first_batches(recipes[0]), first_batches(recipes[1])
    for p, q in zip(one, two, strict=True):
        assert p["index"] == q["index"] and torch.equal(p["images"], q["images"])
        assert torch.equal(p["actions"], q["actions"])
    drawn = r.train_set.rows[list(r._sampler(1))[4:16]].tolist()
    assert [i for b in one for i in b["index"]] == drawn


def test_resume_and_reopening_check_every_member(mix, tmp_path):
    for name in ("a", "b"):
        shutil.copytree(mix / name, tmp_path / name)
    mixture = tmp_path / "mix.json"
    mixture.write_text(json.dumps({"datasets": [{"path": "a", "weight": 2}, {"path": "b", "weight": 1}]}))
    s = toy_settings(mix, tmp_path / "a", DATASET=mixture, EXPERIMENT="E0", MAX_STEPS=3, SAVE_EVERY=1,
                     OUTPUT_DIR=tmp_path / "runs")
    run_dir = run_dir_for(s)
    train_run(s, run_dir, stop_after=2, progress_bar=False)
    mixture.write_text(json.dumps({"datasets": [{"path": "a", "weight": 1}, {"path": "b", "weight": 1}]}))
    reset_accelerate()
    with pytest.raises(DataError, match=rf"dataset 1 of the mixture, {tmp_path / 'a'}, has weight 0.5, the run was "
                                        r"trained with 0.666667"):
        train_run(s, run_dir, resume=True, progress_bar=False)
    mixture.write_text(json.dumps({"datasets": [{"path": "a", "weight": 2}, {"path": "b", "weight": 1}]}))
    reset_accelerate()
    assert train_run(s, run_dir, resume=True, progress_bar=False).step == 3

    from fplus.eval.offline import evaluate_run

    result, _ = evaluate_run(run_dir, ("none",))  # the validation episodes of both members
    val = Split.load(run_dir / SPLIT).val
    opened = open_run(load_run(run_dir), "cpu")
    assert result["modes"]["none"]["samples"] == sum(opened.dataset.episode(e).length for e in val)
    from fplus.deploy.export import export_run

    _, marker = export_run(run_dir, tmp_path / "export")
    assert [m["dataset"] for m in marker["dataset"]["members"]] == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert marker["dataset"]["episodes"] == 8 and marker["observation"]["tasks"] == opened.dataset.tasks
    shutil.rmtree(tmp_path / "b")
    write_toy_dataset(tmp_path / "b", lengths=(8, 14, 10), seed=2)  # member b changes, a does not
    with pytest.raises(DataError, match=rf"dataset 2 of the mixture, {tmp_path / 'b'}, changed \(fingerprint ") as err:
        open_run(load_run(run_dir), "cpu")
    assert "dataset 1" not in str(err.value)


def test_fplus_latents_computes_every_member_into_its_own_cache_entry(mix, tmp_path):
    spec = f"{mix / 'a'},{mix / 'b'}"
    out = run_cli("latents", "--dataset", spec, "--image-key", CAM, "--encoder", "tiny", "--cache-dir",
                  tmp_path / "cache")
    assert out.exit_code == 0, out.stdout + out.stderr
    assert out.stdout.count("computed:") == 2
    s = toy_settings(tmp_path, mix / "a", DATASET=spec)
    w = s.world
    entries, latents = find_dataset_latents(w.cache_dir, MixtureDataset(
        [LeRobotDataset.open(mix / n) for n in ("a", "b")], ["a", "b"], [0.5, 0.5], [None, None]), CAM, w.source,
        w.dino_model, w.pooling, w.temporal_window)
    own = [find_latents(w.cache_dir, LeRobotDataset.open(mix / n), CAM, w.source, w.dino_model, w.pooling,
                        w.temporal_window) for n in ("a", "b")]
    assert entries == [e for e, _ in own] and entries[0] != entries[1]
    assert np.array_equal(latents, np.concatenate([z for _, z in own]))


def test_a_coc_experiment_on_a_mixture_is_refused_before_training(mix, tmp_path):
    from fplus.errors import ConfigError

    coc = tmp_path / "coc.jsonl"
    coc.write_text("")  # never read: the mixture is refused first
    s = toy_settings(tmp_path, mix / "a", DATASET=f"{mix / 'a'}:0.5,{mix / 'b'}:0.5", EXPERIMENT="E3",
                     COC_JSONL=coc, CACHE_DIR=mix / "cache")
    with pytest.raises(ConfigError, match=r"experiment E3 trains a CoC loss, whose labels \(COC_JSONL\) name the "
                                          r"episodes of one dataset: train it on one dataset, not on a mixture"):
        train_run(s, run_dir_for(s), progress_bar=False)
    reset_accelerate()
    assert run_state(run_dir_for(s)) == "new"
