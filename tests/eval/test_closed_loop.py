"""Closed-loop evaluation in Meta-World with a tiny trained policy (success itself is not asserted: the tiny
policy trains for a few steps; the demo run reports the real numbers)."""

import json

import numpy as np
import pytest
import torch

from fplus.errors import FplusError
from fplus.eval.closed_loop import OnlineLatents, evaluate_closed_loop, wilson_interval
from fplus.world.encoders import build_encoder


def test_wilson_interval_golden_values():
    lo, hi = wilson_interval(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(0, 20)[1] == pytest.approx(0.1611, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_online_latents_match_the_offline_causal_clips():
    enc = build_encoder("vjepa", dino_model="tiny", vjepa_model="tiny", pooling="cls", temporal_window=4)
    frames = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    online = OnlineLatents(enc, history=3)
    for f in frames:
        online.add(f)
    from fplus.data.windows import causal_window

    rows = causal_window(np.arange(6), np.zeros(6, dtype=int), enc.temporal_window)
    offline = enc.encode_frames(torch.from_numpy(frames[rows])).half().float()  # the cache stores float16
    assert torch.equal(torch.stack(online.latents), offline)
    assert torch.equal(online.history_window()[0], offline[3:6])


def test_a_frame_gets_the_same_standardised_latent_offline_and_online(tmp_path):
    """The cache (fplus latents) and the closed loop's online encoder, through the same policy's standardisation."""
    from fplus.data.lerobot import keys_from_settings
    from fplus.model.policy import FPlusPolicy, PolicyConfig
    from fplus.train.data import PolicySamples
    from fplus.world.cache import find_latents
    from tests.helpers import CAM, compute_toy_latents, toy_settings, write_toy_dataset

    ds = write_toy_dataset(tmp_path / "ds", lengths=(7, 6))
    s = toy_settings(tmp_path, tmp_path / "ds")
    compute_toy_latents(s)
    _, cache = find_latents(s.world.cache_dir, ds, CAM, "dino", "tiny", "cls", 8)
    config = PolicyConfig(backbone="tiny", action_dim=2, action_horizon=4, image_size=64, world_dim=cache.shape[1],
                          history=3, future=2, prophet=True, injection=True)
    stats = {"action": {"mean": np.zeros(2), "std": np.ones(2)}}
    policy = FPlusPolicy.build(config, stats, "action", None)
    z = torch.from_numpy(np.asarray(cache, dtype=np.float32))
    policy.set_latent_stats(z.mean(0) + 0.3, z.std(0) * 0.5)  # any statistics: the same transform on both paths
    samples = PolicySamples(ds, keys_from_settings(s.data), [1], 4, 3, 2, latents=np.asarray(cache))
    # the frames the cache encoded (decoded from the dataset's video), now fed one by one to the online encoder
    frames = ds.episode_frames(CAM, 1)
    enc = build_encoder("dino", dino_model="tiny", vjepa_model="tiny", pooling="cls", temporal_window=8)
    online = OnlineLatents(enc, history=3)
    for t, frame in enumerate(frames):
        online.add(frame)
        offline_hist = samples[t]["z_hist"][None]
        assert torch.equal(policy.standardize(online.history_window()), policy.standardize(offline_hist)), t


@pytest.mark.slow
def test_closed_loop_metaworld_with_a_tiny_policy(tmp_path):
    from accelerate.state import AcceleratorState, PartialState

    from fplus.data.demo import make_demo_dataset
    from fplus.train.run import run_dir_for, train_run
    from tests.helpers import compute_toy_latents, toy_settings

    make_demo_dataset(tmp_path / "ds", tasks=["reach-v3"], episodes_per_task=3, image_size=64, seed=0,
                      max_steps=100, progress=False)
    s = toy_settings(tmp_path, tmp_path / "ds", IMAGE_KEY="observation.images.image", EXPERIMENT="E2",
                     MAX_STEPS=2, VAL_FRACTION=0.34, DEMO_MAX_STEPS=12)
    compute_toy_latents(s)
    train_run(s, run_dir_for(s), progress_bar=False)
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    result, path = evaluate_closed_loop(run_dir_for(s), "metaworld", None, episodes=2,
                                        modes=("none", "zero", "random", "shuffle", "oracle", "history"),
                                        progress=False, video_dir=tmp_path / "videos", corrupted_episodes=1)
    saved = json.loads(path.read_text())
    assert saved["simulator"] == "metaworld" and list(saved["tasks"]) == ["reach-v3"]
    per_mode = saved["tasks"]["reach-v3"]
    for mode in ("none", "zero", "random", "shuffle", "history"):
        r = per_mode[mode]
        n = 2 if mode == "none" else 1  # EVAL_EPISODES_CORRUPTED: fewer episodes for the diagnostic modes
        assert r["episodes"] == n and 0 <= r["successes"] <= n
        assert r["ci95"][0] <= r["rate"] <= r["ci95"][1]
    assert saved["episodes_per_mode"] == {"none": 2, "zero": 1, "random": 1, "shuffle": 1, "oracle": 1,
                                          "history": 1}
    assert per_mode["oracle"]["successes"] is None and "not observed" in per_mode["oracle"]["note"]
    assert set(saved["overall"]) == {"none", "zero", "random", "shuffle", "history"}
    assert (tmp_path / "videos" / "reach-v3-none-ep0.mp4").stat().st_size > 0
    # a Meta-World run cannot drive LIBERO's arm: refused before any simulator is built
    with pytest.raises(FplusError, match="the run's actions have 4 dimensions, libero takes 7"):
        evaluate_closed_loop(run_dir_for(s), "libero", None, episodes=1, progress=False)
