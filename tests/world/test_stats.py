"""fplus.world.stats.latent_spread: degenerate (near-constant) latents are flagged, spread ones are not, and the
numbers are exact on hand-built arrays."""

import math

import numpy as np
import pytest

from fplus.errors import FplusError
from fplus.world.stats import DEGENERATE_RATIO, latent_spread


def test_near_constant_latents_are_degenerate():
    rng = np.random.default_rng(0)
    constant = rng.normal(size=64)
    constant *= 5.65 / np.linalg.norm(constant)  # the audited norm
    latents = (constant + 0.01 * rng.normal(size=(3000, 64))).astype(np.float16)
    episode_of = np.repeat(np.arange(30), 100)
    s = latent_spread(latents, episode_of)
    assert s["degenerate"] is True and s["ratio"] < DEGENERATE_RATIO
    assert s["mean_norm"] == pytest.approx(5.65, rel=1e-3)
    assert s["between_frame_std"] == pytest.approx(0.01, rel=0.1)
    assert s["ratio"] == pytest.approx(0.01 / 5.65, rel=0.1)
    assert s["cos_random_pairs"] > 0.999 and s["cos_consecutive"] > 0.999
    assert s["frames"] == 3000 and s["sampled"] == 3000


def test_zero_mean_gaussian_latents_are_not_degenerate():
    rng = np.random.default_rng(1)
    latents = rng.normal(size=(4000, 64))
    s = latent_spread(latents, np.repeat(np.arange(40), 100))
    assert s["degenerate"] is False and s["ratio"] > 5
    assert s["between_frame_std"] == pytest.approx(1.0, abs=0.02)
    assert s["mean_norm"] == pytest.approx(math.sqrt(64 / 4000), rel=0.3)
    assert abs(s["cos_random_pairs"]) < 0.02 and abs(s["cos_consecutive"]) < 0.03


def test_exact_values_on_a_tiny_array():
    # rows (1, 0), (0, 1), (1, 1): mean (2/3, 2/3), variance per dimension 2/9
    latents = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32)
    s = latent_spread(latents, episode_of=np.array([7, 7, 8]))
    assert s["mean_norm"] == pytest.approx(math.sqrt(8) / 3, abs=1e-12)
    assert s["between_frame_std"] == pytest.approx(math.sqrt(2) / 3, abs=1e-12)
    assert s["ratio"] == pytest.approx(0.5, abs=1e-12)
    # every pair: cos((1,0),(0,1)) = 0, cos((1,0),(1,1)) = cos((0,1),(1,1)) = 1/sqrt(2)
    assert s["cos_random_pairs"] == pytest.approx(2 / (3 * math.sqrt(2)), abs=1e-12)
    assert s["cos_consecutive"] == 0.0  # only frames 0 -> 1 share an episode
    assert s["degenerate"] is False
    both = latent_spread(latents, episode_of=np.array([7, 7, 7]))
    assert both["cos_consecutive"] == pytest.approx(1 / (2 * math.sqrt(2)), abs=1e-12)
    assert latent_spread(latents)["cos_consecutive"] is None
    same = latent_spread(np.ones((4, 3)))  # identical frames: no spread at all
    assert same["ratio"] == 0.0 and same["degenerate"] is True and same["cos_random_pairs"] == pytest.approx(1.0)


def test_big_arrays_use_a_seeded_subsample(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "latents.npy"
    np.save(path, (3.0 + rng.normal(size=(50000, 16))).astype(np.float16))
    latents = np.load(path, mmap_mode="r")
    episode_of = np.repeat(np.arange(500), 100)
    a = latent_spread(latents, episode_of, sample=2000, seed=3)
    assert a == latent_spread(latents, episode_of, sample=2000, seed=3)  # deterministic
    assert a["sampled"] == 2000 and a["frames"] == 50000
    assert a["between_frame_std"] == pytest.approx(1.0, rel=0.05) and a["mean_norm"] == pytest.approx(12.0, rel=0.02)
    assert a["ratio"] == pytest.approx(1 / 12, rel=0.06) and a["degenerate"] is False


def test_bad_inputs_are_clear_errors():
    with pytest.raises(FplusError, match="non-empty"):
        latent_spread(np.zeros((0, 4)))
    with pytest.raises(FplusError, match="one episode per frame"):
        latent_spread(np.zeros((5, 4)), episode_of=np.zeros(4))
