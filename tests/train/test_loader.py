"""The training loader: one DataLoader for the whole run (persistent workers) whose batches are those of a fresh
per-epoch loader, bit for bit, whatever the number of workers, from any position of an epoch (exact resume)."""

import multiprocessing

import torch
from torch.utils.data import DataLoader

from fplus import batch as K
from fplus.model.augment import ImageAugment
from fplus.rundir import run_dir_for
from fplus.train.data import Collate, EpochSampler
from fplus.train.recipe import TrainRecipe
from fplus.train.run import train_run
from tests.helpers import reset_accelerate, toy_settings
from tests.train.test_augment_train import assert_same
from tests.train.test_augment_train import recipe as augmented_recipe


def recipe(root, out, **values) -> TrainRecipe:
    """A set-up augmented E0 recipe (the augmentation draws are keyed by the epoch the workers must see)."""
    return augmented_recipe(root, out, AUGMENT="default", **values)


def run_epochs(r: TrainRecipe, positions: list[tuple[int, int]]) -> tuple[list[list[dict]], set[int]]:
    """The batches of each (epoch, start sample) through one loader, as `fit` iterates it, and the pids of the
    worker processes that made them."""
    loader, out, pids = None, [], set()
    for epoch, start in positions:
        sampler = r._sampler(epoch, start=start)
        if loader is None:
            loader = r._loader(r.train_set, sampler)
        else:
            loader.sampler.epoch_sampler = sampler
        it = iter(loader)
        out.append(list(it))
        pids |= {w.pid for w in getattr(it, "_workers", [])}
    return out, pids


def test_one_persistent_loader_gives_the_batches_of_a_fresh_loader_per_epoch(toy_ds, tmp_path):
    r0 = recipe(toy_ds, tmp_path / "w0", NUM_WORKERS=0)
    processor = r0.accelerator.unwrap_model(r0.model).processor
    augment = ImageAugment.from_settings(r0.settings.data, r0.settings.train.seed)
    # today's pipeline: a new loader per epoch, its Collate told the epoch
    fresh = [list(DataLoader(r0.train_set, batch_size=4, sampler=EpochSampler(len(r0.train_set), 0, epoch=e),
                             collate_fn=Collate(processor, with_coc=True, augment=augment, epoch=e)))
             for e in (0, 1)]
    assert r0.settings.train.seed == 0 and len(fresh[0]) > 3
    positions = [(0, 0), (1, 0), (1, 8)]  # two epochs, then epoch 1 again from its 9th sample (a resume)
    for workers in (0, 2):
        r = r0 if workers == 0 else recipe(toy_ds, tmp_path / "w2", NUM_WORKERS=workers)
        got, pids = run_epochs(r, positions)
        assert len(pids) == workers  # the same workers served every epoch
        for batches, want in zip(got, [fresh[0], fresh[1], fresh[1][2:]], strict=True):  # 8 samples: 2 batches
            assert len(batches) == len(want)
            for a, b in zip(batches, want, strict=True):
                assert_same(a, b)
    assert not torch.equal(fresh[0][0][K.IMAGES], fresh[1][0][K.IMAGES])  # the epochs' draws differ


def test_fit_with_workers_leaves_no_worker_processes(toy_ds, tmp_path):
    s = toy_settings(toy_ds, toy_ds / "ds", OUTPUT_DIR=tmp_path, EXPERIMENT="E0", BATCH_SIZE=4, MAX_STEPS=12,
                     NUM_WORKERS=2, VAL_BATCHES=1)
    reset_accelerate()
    before = {p.pid for p in multiprocessing.active_children()}
    progress = train_run(s, run_dir_for(s), progress_bar=False)  # 11 steps per epoch: two epochs
    assert progress.step == 12 and progress.epoch == 1
    assert {p.pid for p in multiprocessing.active_children()} == before


def test_one_validation_loader_serves_every_validation_with_the_same_workers(toy, tmp_path):
    """E2 with NUM_WORKERS=1: the recipe's validations read one persistent loader (same worker process), and give
    the numbers of a fresh single-process evaluation exactly."""
    from fplus.train.validation import evaluate_modes

    s = toy_settings(toy, toy / "ds", OUTPUT_DIR=tmp_path, EXPERIMENT="E2", BATCH_SIZE=4, NUM_WORKERS=1)
    r = TrainRecipe(s, run_dir_for(s), progress_bar=False)
    r.setup()
    first = r.validate()
    pids = {w.pid for w in r._val_loader._iterator._workers}
    second = r.validate()
    assert {w.pid for w in r._val_loader._iterator._workers} == pids and len(pids) == 1
    assert first == second
    policy = r.accelerator.unwrap_model(r.model)
    alone = evaluate_modes(policy, r.val_set, ("none", "zero", "random"), s.train.batch_size, num_workers=0)
    for mode in ("none", "zero", "random"):
        assert first[f"val_mse_{mode}"] == alone["modes"][mode]["mse_norm"], mode
