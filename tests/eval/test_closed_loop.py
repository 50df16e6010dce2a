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
    offline = enc.encode_frames(torch.from_numpy(frames[rows]))
    torch.testing.assert_close(torch.stack(online.latents), offline)
    torch.testing.assert_close(online.history_window()[0], offline[3:6])


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
                                        modes=("none", "zero", "random", "shuffle", "oracle"), progress=False,
                                        video_dir=tmp_path / "videos")
    saved = json.loads(path.read_text())
    assert saved["simulator"] == "metaworld" and list(saved["tasks"]) == ["reach-v3"]
    per_mode = saved["tasks"]["reach-v3"]
    for mode in ("none", "zero", "random", "shuffle"):
        r = per_mode[mode]
        assert r["episodes"] == 2 and 0 <= r["successes"] <= 2
        assert r["ci95"][0] <= r["rate"] <= r["ci95"][1]
    assert per_mode["oracle"]["successes"] is None and "not observed" in per_mode["oracle"]["note"]
    assert set(saved["overall"]) == {"none", "zero", "random", "shuffle"}
    assert (tmp_path / "videos" / "reach-v3-none-ep0.mp4").stat().st_size > 0
    # a Meta-World run cannot drive LIBERO's arm: refused before any simulator is built
    with pytest.raises(FplusError, match="the run's actions have 4 dimensions, libero takes 7"):
        evaluate_closed_loop(run_dir_for(s), "libero", None, episodes=1, progress=False)
