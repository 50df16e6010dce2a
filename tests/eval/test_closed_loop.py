"""Closed-loop evaluation in Meta-World: the rollout loop driven by the scripted expert (exact successes and
steps), then the whole evaluation of a tiny trained policy (its recorded results; the demo run reports real numbers)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fplus import batch as K
from fplus.deploy.episode import OnlineLatents
from fplus.errors import FplusError
from fplus.eval.closed_loop import evaluate_closed_loop, rollout, wilson_interval
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
    from fplus.model.policy import FPlusPolicy
    from fplus.train.data import PolicySamples
    from fplus.world.cache import find_latents
    from tests.helpers import CAM, compute_toy_latents, policy_config, toy_settings, write_toy_dataset

    ds = write_toy_dataset(tmp_path / "ds", lengths=(7, 6))
    s = toy_settings(tmp_path, tmp_path / "ds")
    compute_toy_latents(s)
    _, cache = find_latents(s.world.cache_dir, ds, CAM, "dino", "tiny", "cls", 8)
    config = policy_config(backbone="tiny", action_dim=2, action_horizon=4, image_size=64, world_dim=cache.shape[1],
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


class ScriptedPolicy:
    """A policy for `rollout`: every chunk is one action of Meta-World's scripted expert for the env's current raw
    observation (`still`: the zero action); keeps the batches it was given."""

    injection = None
    config = SimpleNamespace(state_dim=4)
    processor = staticmethod(lambda batch: batch)  # no prompt: nothing reads it

    def __init__(self, env, still: bool = False):
        from fplus.sim.metaworld import make_expert

        self.env, self.expert, self.still, self.batches = env, make_expert(env.task), still, []

    def predict(self, batch, corruption, generator, memory=None):
        from fplus.sim.metaworld import expert_action

        self.batches.append(batch)
        action = np.zeros(4, np.float32) if self.still else expert_action(self.expert, self.env.raw_obs)
        return SimpleNamespace(actions=torch.from_numpy(action)[None, None], memory=None)


def test_the_closed_loop_with_the_expert_succeeds_where_the_demo_episode_does():
    pytest.importorskip("metaworld")
    from fplus.sim.metaworld import MetaWorldEnv, run_expert_episode

    with MetaWorldEnv("reach-v3", image_size=32, max_steps=100) as env:
        demos = [run_expert_episode(env, seed) for seed in (0, 1, 2)]
        expert = ScriptedPolicy(env)
        wins, steps = 0, []
        for seed in (0, 1, 2):
            wins += rollout(expert, env, "reach", seed, "none", 1, None, None, torch.Generator())
            steps.append(env.steps)
        assert wins == 3
        # the loop stops at the step of the first success: the demo's first success, 0-based, plus one
        assert steps == [d.first_success_step + 1 for d in demos] == [46, 51, 41]
        first = expert.batches[0]  # the policy saw the demo's first frame and state, as a batch of one
        np.testing.assert_array_equal(first[K.IMAGES][0].numpy(), demos[0].images[0])
        np.testing.assert_array_equal(first[K.STATE][0].numpy(), demos[0].state[0])
        assert first[K.INSTRUCTIONS] == ["reach"] and len(expert.batches) == sum(steps)
        assert not rollout(ScriptedPolicy(env, still=True), env, "reach", 0, "none", 1, None, None,
                           torch.Generator())
        assert env.steps == 100  # a policy that never reaches the goal runs out the episode


@pytest.mark.slow
def tiny_metaworld_run(tmp_path, demo_max_steps: int):
    """The settings of a tiny E2 run (2 optimiser steps) on a 3-episode reach-v3 demo dataset, trained."""
    from fplus.data.demo import make_demo_dataset
    from fplus.rundir import run_dir_for
    from fplus.train.run import train_run
    from tests.helpers import compute_toy_latents, reset_accelerate, toy_settings

    make_demo_dataset(tmp_path / "ds", tasks=["reach-v3"], episodes_per_task=3, image_size=64, seed=0,
                      max_steps=100, progress=False)
    s = toy_settings(tmp_path, tmp_path / "ds", IMAGE_KEY="observation.images.image", EXPERIMENT="E2",
                     MAX_STEPS=2, VAL_FRACTION=0.34, DEMO_MAX_STEPS=demo_max_steps)
    compute_toy_latents(s)
    train_run(s, run_dir_for(s), progress_bar=False)
    reset_accelerate()
    return s


def test_closed_loop_metaworld_with_a_tiny_policy(tmp_path, monkeypatch):
    from fplus.rundir import run_dir_for
    from fplus.sim.metaworld import MetaWorldEnv

    s = tiny_metaworld_run(tmp_path, demo_max_steps=12)

    episodes = []  # [seed, object and goal position at reset, steps taken] of every rollout
    reset, step = MetaWorldEnv.reset, MetaWorldEnv.step

    def spy_reset(env, seed):
        obs = reset(env, seed)
        episodes.append([seed, np.concatenate([env.raw_obs[4:7], env.raw_obs[36:39]]), 0])
        return obs

    def spy_step(env, action):
        episodes[-1][2] += 1
        return step(env, action)

    monkeypatch.setattr(MetaWorldEnv, "reset", spy_reset)
    monkeypatch.setattr(MetaWorldEnv, "step", spy_step)
    result, path = evaluate_closed_loop(run_dir_for(s), "metaworld", None, episodes=2,
                                        modes=("none", "zero", "random", "shuffle", "oracle", "history"),
                                        progress=False, video_dir=tmp_path / "videos", corrupted_episodes=1)
    saved = json.loads(path.read_text())
    assert saved["simulator"] == "metaworld" and list(saved["tasks"]) == ["reach-v3"]
    per_mode = saved["tasks"]["reach-v3"]
    # recorded: 12 steps (DEMO_MAX_STEPS) of a policy trained for 2 steps never reach the goal
    for mode in ("none", "zero", "random", "shuffle", "history"):
        n = 2 if mode == "none" else 1  # EVAL_EPISODES_CORRUPTED: fewer episodes for the diagnostic modes
        assert per_mode[mode] == {"successes": 0, "episodes": n, "rate": 0.0,
                                  "ci95": [0.0, pytest.approx(0.6576280471 if n == 2 else 0.7934567085)]}
        assert saved["overall"][mode] == per_mode[mode]
    assert saved["n_action_steps"] == 2 and saved["max_steps"] == 12  # half the horizon of 4; DEMO_MAX_STEPS
    # episode e of every mode starts from layout 1000 + e (the recorded layout of seed 1000), the same for all
    # modes (oracle rolls nothing out), and runs out its 12 steps
    assert [e[0] for e in episodes] == [1000, 1001, 1000, 1000, 1000, 1000]
    assert [e[2] for e in episodes] == [12] * 6
    np.testing.assert_allclose(episodes[0][1], [-0.04369088, 0.67536816, 0.02, 0.07274442, 0.88053722, 0.11209317],
                               atol=2e-8)
    assert saved["episodes_per_mode"] == {"none": 2, "zero": 1, "random": 1, "shuffle": 1, "oracle": 1,
                                          "history": 1}
    assert per_mode["oracle"]["successes"] is None and "not observed" in per_mode["oracle"]["note"]
    assert set(saved["overall"]) == {"none", "zero", "random", "shuffle", "history"}
    assert (tmp_path / "videos" / "reach-v3-none-ep0.mp4").stat().st_size > 0
    # a Meta-World run cannot drive LIBERO's arm: refused before any simulator is built
    with pytest.raises(FplusError, match="the run's actions have 4 dimensions, libero takes 7"):
        evaluate_closed_loop(run_dir_for(s), "libero", None, episodes=1, progress=False)


def test_an_exported_folder_rolls_out_the_runs_actions_bit_for_bit(tmp_path, monkeypatch):
    """`fplus eval OUT --sim`: the folder's policy drives the simulator exactly as the run's checkpoint does, and
    its results go to OUT/eval/ without breaking the folder's hashes."""
    from fplus.deploy.export import export_run
    from fplus.model.pretrained import verify_folder
    from fplus.rundir import run_dir_for
    from fplus.sim.metaworld import MetaWorldEnv

    s = tiny_metaworld_run(tmp_path, demo_max_steps=8)
    folder, _ = export_run(run_dir_for(s), tmp_path / "exported")
    actions: list[np.ndarray] = []
    step = MetaWorldEnv.step
    monkeypatch.setattr(MetaWorldEnv, "step", lambda env, action: actions.append(np.array(action)) or step(env, action))
    results = {}
    for name, where in (("run", run_dir_for(s)), ("export", folder)):
        actions.clear()
        result, path = evaluate_closed_loop(where, "metaworld", None, episodes=1, modes=("none", "zero"),
                                            progress=False, corrupted_episodes=1)
        results[name] = (np.stack(actions), result, path)
    run_actions, run_result, _ = results["run"]
    export_actions, export_result, export_path = results["export"]
    assert run_actions.shape == (16, 4)  # 8 steps of `none`, 8 of `zero`
    np.testing.assert_array_equal(export_actions, run_actions)
    assert export_path == folder / "eval" / "sim-metaworld-step-000002.json"
    assert export_result["tasks"] == run_result["tasks"] and export_result["step"] == 2
    verify_folder(folder)  # eval/ is not part of the hashed files
