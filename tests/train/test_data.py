import numpy as np
import torch

from fplus import batch as K
from fplus.data.lerobot import DataKeys
from fplus.train.data import EpochSampler, PolicySamples, collate
from tests.helpers import CAM, write_toy_dataset

KEYS = DataKeys(image=CAM, state="observation.state", action="action", instruction="task")


def test_samples_preloaded_equal_samples_decoded_on_demand(tmp_path):
    ds = write_toy_dataset(tmp_path / "ds", lengths=(6, 9))
    latents = np.arange(ds.num_frames * 3, dtype=np.float16).reshape(-1, 3)
    a = PolicySamples(ds, KEYS, [0, 1], horizon=4, history=3, future=2, latents=latents, preload=True)
    b = PolicySamples(ds, KEYS, [0, 1], horizon=4, history=3, future=2, latents=latents, preload=False)
    assert len(a) == 15
    for i in (0, 5, 6, 14):
        sa, sb = a[i], b[i]
        assert torch.equal(sa[K.IMAGES], sb[K.IMAGES])
        assert torch.equal(sa[K.ACTIONS], sb[K.ACTIONS])
    s = a[5]  # last frame of episode 0: the chunk pads, the future is invalid, the history ends at t
    assert s[K.ACTION_PAD].tolist() == [False, True, True, True]
    assert s[K.FUTURE_VALID].tolist() == [False, False]
    assert s[K.Z_HIST][:, 0].tolist() == [9.0, 12.0, 15.0]
    assert s[K.INSTRUCTIONS] == "move the square right" and s[K.STATE].shape == (2,)
    batch = collate([a[0], a[7]])
    assert batch[K.IMAGES].shape == (2, 64, 64, 3) and batch[K.INSTRUCTIONS][1] == "move the square down"


def test_epoch_sampler_is_seeded_sharded_and_resumable():
    full = list(EpochSampler(10, seed=3, epoch=1))
    assert sorted(full) == list(range(10)) and full == list(EpochSampler(10, seed=3, epoch=1))
    assert full != list(EpochSampler(10, seed=3, epoch=2))
    assert list(EpochSampler(10, seed=3, epoch=1, start=4)) == full[4:]
    r0, r1 = list(EpochSampler(9, 3, 1, rank=0, world=2)), list(EpochSampler(9, 3, 1, rank=1, world=2))
    assert len(r0) == len(r1) == 5 and set(r0) | set(r1) == set(range(9))
