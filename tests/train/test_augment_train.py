"""Training-time augmentation in the recipe (AUGMENT): training batches only, independent of the worker count,
bit-identical after a kill + resume; validation (and so offline eval, which runs the same loop) never augments."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from fplus import batch as K
from fplus import checkpoint as ckpt
from fplus.model.augment import ImageAugment
from fplus.rundir import run_dir_for, run_state
from fplus.train.data import Collate, EpochSampler
from fplus.train.recipe import TrainRecipe
from fplus.train.run import train_run
from tests.helpers import reset_accelerate as _reset_accelerate
from tests.helpers import toy_settings


def recipe(root, out, **values) -> TrainRecipe:
    """A set-up E0 recipe (nothing trained) with these settings."""
    _reset_accelerate()
    s = toy_settings(root, root / "ds", OUTPUT_DIR=out, EXPERIMENT="E0", BATCH_SIZE=4, **values)
    r = TrainRecipe(s, run_dir_for(s), progress_bar=False)
    r.setup()
    return r


def tensors(batch: dict) -> dict[str, torch.Tensor]:
    """Every tensor of a batch, the prompt's fields included (as prompt.<field>)."""
    out = {k: v for k, v in batch.items() if torch.is_tensor(v)}
    for f in dataclasses.fields(batch[K.PROMPT]):
        value = getattr(batch[K.PROMPT], f.name)
        if torch.is_tensor(value):
            out[f"prompt.{f.name}"] = value
    return out


def assert_same(a: dict, b: dict, skip=()) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        if k not in skip:
            assert torch.equal(ta[k], tb[k]), k
    assert a[K.INSTRUCTIONS] == b[K.INSTRUCTIONS] and a["index"] == b["index"]


def test_only_training_images_are_augmented(toy_ds, tmp_path):
    plain = recipe(toy_ds, tmp_path / "none", AUGMENT="none")
    sampler = EpochSampler(len(plain.train_set), plain.settings.train.seed, epoch=0)
    before = DataLoader(plain.train_set, batch_size=4, sampler=sampler,  # the training loader before AUGMENT
                        collate_fn=Collate(plain.accelerator.unwrap_model(plain.model).processor, with_coc=True))
    today = list(before)
    off = list(plain._loader(plain.train_set, sampler))
    assert len(off) == len(today)
    for a, b in zip(off, today, strict=True):
        assert_same(a, b)  # AUGMENT=none: bit-equal to the batches of today's pipeline
    val_off = plain.validate()

    augmented = recipe(toy_ds, tmp_path / "default", AUGMENT="default")
    on = list(augmented._loader(augmented.train_set, sampler))
    for a, b in zip(on, today, strict=True):
        assert_same(a, b, skip=(K.IMAGES, "prompt.pixel_values"))  # actions, states, tokens untouched
        assert not torch.equal(a[K.IMAGES], b[K.IMAGES])
        assert not torch.equal(a[K.PROMPT].pixel_values, b[K.PROMPT].pixel_values)
        assert a[K.IMAGES].dtype == torch.uint8 and a[K.IMAGES].shape == b[K.IMAGES].shape
    # the same initial weights validated on the same validation batches: AUGMENT never reaches validation
    assert augmented.validate() == val_off
    assert set(val_off) >= {"val_mse_none"}


def test_augmented_batches_do_not_depend_on_the_worker_count(toy_ds, tmp_path):
    batches = {}
    for workers in (0, 2):
        r = recipe(toy_ds, tmp_path / f"w{workers}", AUGMENT="default", NUM_WORKERS=workers)
        # epoch 1, started mid-epoch (as a resumed run starts): the draws are keyed by epoch and frame row
        sampler = EpochSampler(len(r.train_set), r.settings.train.seed, epoch=1, start=4)
        batches[workers] = list(r._loader(r.train_set, sampler))
        assert r._loader(r.train_set, sampler).num_workers == workers
    assert len(batches[0]) == len(batches[2]) > 3
    for a, b in zip(batches[0], batches[2], strict=True):
        assert_same(a, b)


def weights(run_dir):
    last = ckpt.latest_valid(run_dir)
    return {**load_file(str(last / "policy/policy.safetensors")),
            **load_file(str(last / "policy/backbone_trainable.safetensors"))}


@pytest.mark.slow
def test_killed_and_resumed_augmented_run_is_bit_identical(toy_ds, tmp_path, monkeypatch):
    """AUGMENT=default: a run killed after step 5 (checkpoint at 4, mid-epoch) and resumed across the epoch boundary
    draws the augmentations of the uninterrupted run and ends with its weights, bit for bit."""
    calls: list[tuple[int, tuple[int, ...]]] = []
    original = ImageAugment.__call__

    def recording(self, images, indices, epoch):
        calls.append((epoch, tuple(indices)))
        return original(self, images, indices, epoch)

    monkeypatch.setattr(ImageAugment, "__call__", recording)
    common = dict(NUM_WORKERS=0, EXPERIMENT="E0", AUGMENT="default", MAX_STEPS=7, SAVE_EVERY=2, GRAD_ACCUM=2,
                  BATCH_SIZE=4,
                  KEEP_LAST=2)
    straight = toy_settings(toy_ds, toy_ds / "ds", OUTPUT_DIR=tmp_path / "a", **common)
    _reset_accelerate()
    train_run(straight, run_dir_for(straight), progress_bar=False)
    straight_calls, calls[:] = list(calls), []

    resumed = toy_settings(toy_ds, toy_ds / "ds", OUTPUT_DIR=tmp_path / "b", **common)
    run_dir = run_dir_for(resumed)
    _reset_accelerate()
    assert train_run(resumed, run_dir, stop_after=5, progress_bar=False).step == 5
    assert run_state(run_dir) == "partial" and ckpt.list_checkpoints(run_dir)[-1].name == "step-000004"
    calls[:] = []
    _reset_accelerate()
    final = train_run(resumed, run_dir, resume=True, progress_bar=False)
    assert final.step == 7 and run_state(run_dir) == "complete"

    # 5 steps per epoch (45 training frames // (BATCH_SIZE 4 x GRAD_ACCUM 2)): 10 micro-batches of epoch 0 and the
    # one fetched when the epoch ends, then the 4 of steps 6 and 7 in epoch 1
    assert [e for e, _ in straight_calls] == [0] * 11 + [1] * 4
    # only the training loader augments (validation ran after each epoch and at the end, and is not here), and
    # the resumed run, from micro-batch 8 on, draws for the samples and epochs the straight run drew for
    assert calls == straight_calls[8:]
    a, b = weights(run_dir_for(straight)), weights(run_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
