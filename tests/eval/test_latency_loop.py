"""The latency-aware closed loop: the rollout schedules chunks with fplus.deploy.chunking (a fake env and policy:
exact actions, observations and predict arguments), then a tiny trained run in Meta-World swept over strategies and
delays (the results file: standard section unchanged, `latency` section with golden counts, merging), the CLI."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fplus import batch as K
from fplus.deploy.chunking import supports_inpainting
from fplus.errors import ConfigError
from fplus.eval.closed_loop import ChunkingStats, latency_table, rollout

H, A = 8, 2


class CountingEnv:
    """obs["state"][0] is the step; never succeeds; done after `max_steps`; keeps the actions it was given."""

    def __init__(self, max_steps: int):
        self.max_steps, self.actions, self.t = max_steps, [], 0

    def _obs(self):
        return {"image": np.zeros((4, 4, 3), np.uint8), "state": np.array([self.t, 0.0], np.float32)}

    def reset(self, episode):
        self.t, self.actions = 0, []
        return self._obs()

    def step(self, action):
        self.actions.append(np.asarray(action).copy())
        self.t += 1
        return self._obs(), False, self.t >= self.max_steps


class StepPolicy:
    """The chunk predicted from the observation of step t: action j = [100 t + j, -(100 t + j)]. Records the
    keyword arguments of every predict call. `inpaint`: the new API (prefix, inference_delay, execution_horizon),
    the first `inference_delay` actions returned are the prefix's (as FPlusPolicy.predict promises)."""

    injection = None
    config = SimpleNamespace(state_dim=2)
    processor = staticmethod(lambda batch: batch)

    def __init__(self):
        self.calls = []

    def predict(self, batch, corruption="none", generator=None, memory=None, prefix=None, inference_delay=0,
                execution_horizon=None):
        t = float(batch[K.STATE][0, 0])
        self.calls.append({"t": t, "prefix": prefix, "inference_delay": inference_delay,
                           "execution_horizon": execution_horizon})
        values = 100 * t + np.arange(H, dtype=np.float32)
        chunk = torch.from_numpy(np.stack([values, -values], axis=1))[None]
        if prefix is not None:
            chunk[0, :inference_delay] = prefix[0, :inference_delay]
        return SimpleNamespace(actions=chunk, memory=None)


class OldPolicy(StepPolicy):
    """A policy whose predict takes no prefix (before RTC)."""

    def predict(self, batch, corruption="none", generator=None, memory=None):
        return super().predict(batch, corruption, generator, memory)


def _roll(policy, strategy: str, d: int, s: int = 4, steps: int = 14):
    env, stats = CountingEnv(steps), ChunkingStats()
    assert not rollout(policy, env, "go", 0, "none", s, None, None, torch.Generator(), inference_delay=d,
                       chunking=strategy, stats=stats)
    return np.array(env.actions)[:, 0], stats


def test_sync_without_delay_is_the_closed_loop_of_before():
    """Old policies (no prefix argument) keep working: a chunk from the observation of every s-th step, its first
    s actions executed."""
    policy = OldPolicy()
    executed, stats = _roll(policy, "sync", 0)
    assert [c["t"] for c in policy.calls] == [0, 4, 8, 12]
    assert executed.tolist() == [100 * (t // 4 * 4) + t % 4 for t in range(14)]
    assert stats.steps == 14 and stats.idle_steps == 0
    assert stats.smoothness.boundary_transitions == 3 and stats.smoothness.within_transitions == 10


def test_naive_executes_the_late_chunk_from_index_d():
    policy = OldPolicy()
    executed, stats = _roll(policy, "naive", 2)
    assert [c["t"] for c in policy.calls] == [0, 4, 8, 12]  # chunk k from o_(4k), arriving at 4k + 2
    assert executed.tolist() == [0, 1, 2, 3, 4, 5, 402, 403, 404, 405, 802, 803, 804, 805]
    assert stats.idle_steps == 2  # only the first chunk was waited for


def test_rtc_sends_the_prefix_to_predict_and_executes_it():
    policy = StepPolicy()
    executed, _ = _roll(policy, "rtc", 2)
    first, *later = policy.calls
    assert first["prefix"] is None and first["inference_delay"] == 0  # predict(...) as before for the first chunk
    for call in later:
        t = int(call["t"])
        assert call["prefix"].dtype == torch.float32 and call["prefix"].shape == (1, H - 4, A)
        assert (call["inference_delay"], call["execution_horizon"]) == (2, 4)
        # the current chunk's actions from step t on (raw units), the first two of which run while it is inferred
        np.testing.assert_array_equal(call["prefix"][0, :, 0].numpy(), 100 * (t - 4) + np.arange(4, H))
        np.testing.assert_array_equal(executed[t:t + 2], call["prefix"][0, :2, 0].numpy())
    assert executed.tolist() == [0, 1, 2, 3, 4, 5, 402, 403, 404, 405, 802, 803, 804, 805]


def test_rtc_needs_a_policy_that_inpaints():
    assert supports_inpainting(StepPolicy()) and not supports_inpainting(OldPolicy())
    from fplus.model.policy import FPlusPolicy

    assert supports_inpainting(FPlusPolicy)  # the real one takes prefix, inference_delay, execution_horizon


def test_a_timing_that_cannot_run_is_refused_before_any_rollout():
    with pytest.raises(ConfigError, match="inference delay d=5 is longer than the execution horizon s=4"):
        _roll(OldPolicy(), "naive", 5)


# ----- a tiny trained run in Meta-World -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def e2_run(tmp_path_factory):
    pytest.importorskip("metaworld")
    from accelerate.state import AcceleratorState, PartialState

    from fplus.data.demo import make_demo_dataset
    from fplus.rundir import run_dir_for
    from fplus.train.run import train_run
    from tests.helpers import compute_toy_latents, toy_settings

    tmp = tmp_path_factory.mktemp("latency")
    make_demo_dataset(tmp / "ds", tasks=["reach-v3"], episodes_per_task=3, image_size=64, seed=0, max_steps=100,
                      progress=False)
    s = toy_settings(tmp, tmp / "ds", IMAGE_KEY="observation.images.image", EXPERIMENT="E2", MAX_STEPS=2,
                     VAL_FRACTION=0.34, DEMO_MAX_STEPS=12)
    compute_toy_latents(s)
    train_run(s, run_dir_for(s), progress_bar=False)
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    return run_dir_for(s)


def test_a_latency_sweep_in_metaworld(e2_run, monkeypatch):
    """H = 4, s = 2 (default), 12 steps an episode, 2 episodes: golden counts of steps, idle steps and transitions;
    rtc's chunks start with the executed prefix (the policy's promise, through the real FPlusPolicy.predict)."""
    from fplus.eval.closed_loop import evaluate_closed_loop
    from fplus.model.policy import FPlusPolicy
    from fplus.sim.metaworld import MetaWorldEnv

    executed, calls = [], []  # every env action; (inference_delay, prefix, chunk) of every rtc request
    step, predict = MetaWorldEnv.step, FPlusPolicy.predict

    def spy_step(env, action):
        executed.append(np.asarray(action).copy())
        return step(env, action)

    def spy_predict(policy, batch, *args, prefix=None, **kwargs):
        out = predict(policy, batch, *args, prefix=prefix, **kwargs)
        if prefix is not None:
            calls.append((kwargs["inference_delay"], len(executed), prefix[0].numpy(), out.actions[0].numpy()))
        return out

    monkeypatch.setattr(MetaWorldEnv, "step", spy_step)
    monkeypatch.setattr(FPlusPolicy, "predict", spy_predict)
    result, path = evaluate_closed_loop(e2_run, "metaworld", None, episodes=2, modes=("none", "zero"),
                                        progress=False, inference_delay=(0, 2), chunking=("sync", "naive", "rtc"))
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(result))
    # the standard section as before: modes x tasks, d = 0 sync
    assert set(saved["tasks"]["reach-v3"]) == {"none", "zero"} and saved["n_action_steps"] == 2
    assert saved["tasks"]["reach-v3"]["none"] == {"successes": 0, "episodes": 2, "rate": 0.0,
                                                  "ci95": [0.0, pytest.approx(0.6576280471)]}
    latency = saved["latency"]
    assert {k: list(v) for k, v in latency.items()} == {"sync": ["0", "2"], "naive": ["0", "2"], "rtc": ["0", "2"]}
    sync0 = latency["sync"]["0"]
    assert (sync0["chunking"], sync0["inference_delay"], sync0["execution_horizon"], sync0["mode"]) == \
        ("sync", 0, 2, "none")
    cell = sync0["tasks"]["reach-v3"]
    assert {k: cell[k] for k in ("successes", "episodes", "rate", "ci95")} == saved["tasks"]["reach-v3"]["none"]
    # per episode: 12 steps, 11 transitions; sync: a switch every 2 steps (5), naive/rtc d=2: the first chunk runs
    # 4 steps, then a switch every 2 (4); idle: sync d per request (6 requests), naive/rtc d before the first chunk
    golden = {("sync", "0"): (5, 0), ("sync", "2"): (5, 12), ("naive", "0"): (5, 0), ("naive", "2"): (4, 2),
              ("rtc", "0"): (5, 0), ("rtc", "2"): (4, 2)}
    for (strategy, d), (boundaries, idle) in golden.items():
        o = latency[strategy][d]["overall"]
        assert o["episodes"] == 2 and o["steps"] == 24 and o["idle_steps"] == 2 * idle, (strategy, d)
        assert o["smoothness"]["boundary_transitions"] == 2 * boundaries
        assert o["smoothness"]["within_transitions"] == 2 * (11 - boundaries)
        assert o["smoothness"]["boundary"] > 0 and o["smoothness"]["within"] > 0  # the actions do change
        task = latency[strategy][d]["tasks"]["reach-v3"]  # one task: overall = the task
        assert {k: v for k, v in o.items() if k != "smoothness"} == {k: v for k, v in task.items() if k != "smoothness"}
        assert o["smoothness"] == pytest.approx(task["smoothness"])
    # d = 0: every strategy is plain chunking (rtc sends no prefix), the same rollouts
    assert latency["naive"]["0"]["overall"] == latency["sync"]["0"]["overall"] == latency["rtc"]["0"]["overall"]
    # in sim time sync does not depend on d: the same rollouts (the same smoothness), only the idle steps differ
    assert latency["sync"]["2"]["overall"]["smoothness"] == latency["sync"]["0"]["overall"]["smoothness"]
    # rtc d=2: requested with the current chunk's last 2 actions, which run during inference; the new chunk's first
    # 2 actions are those, so the executed sequence is the new chunk's plan from its request on
    rtc2 = [c for c in calls if c[0] == 2]
    assert len(rtc2) == 2 * 5  # 5 requests after the first in each of the 2 episodes
    for _, at, prefix, chunk in rtc2:
        assert prefix.shape == (2, 4)
        np.testing.assert_array_equal(chunk[:2], prefix)
        np.testing.assert_array_equal(np.array(executed[at:at + 2]), prefix)
    table = latency_table(result)
    assert table is not None and table.row_count == 6


def test_a_second_sweep_keeps_the_first_ones_settings(e2_run):
    from fplus.eval.closed_loop import evaluate_closed_loop

    first, _ = evaluate_closed_loop(e2_run, "metaworld", None, episodes=1, modes=("none",), progress=False,
                                    inference_delay=(1,), chunking=("naive",))
    assert {k: list(v) for k, v in first["latency"].items()} == {"sync": ["0"], "naive": ["1"]}
    second, path = evaluate_closed_loop(e2_run, "metaworld", None, episodes=1, modes=("none",), progress=False,
                                        inference_delay=2, chunking="rtc")
    assert {k: list(v) for k, v in second["latency"].items()} == {"sync": ["0"], "naive": ["1"], "rtc": ["2"]}
    assert second["latency"]["naive"]["1"] == first["latency"]["naive"]["1"]
    # the standard evaluation alone keeps the latency results of this checkpoint too
    third, _ = evaluate_closed_loop(e2_run, "metaworld", None, episodes=1, modes=("none",), progress=False)
    assert third["latency"] == second["latency"] and set(third["tasks"]["reach-v3"]) == {"none"}
    # other episode counts: the earlier numbers are not comparable and are dropped, like the tasks
    fourth, _ = evaluate_closed_loop(e2_run, "metaworld", None, episodes=2, modes=("none",), progress=False)
    assert "latency" not in fourth and "latency" not in json.loads(path.read_text())


def test_settings_that_do_not_fit_the_run_are_refused_before_rollouts(e2_run):
    from fplus.eval.closed_loop import evaluate_closed_loop

    with pytest.raises(ConfigError, match=r"s \+ d = 5, but chunks hold H=4"):
        evaluate_closed_loop(e2_run, "metaworld", None, episodes=1, progress=False, n_action_steps=3,
                             inference_delay=2, chunking="rtc")
    with pytest.raises(ConfigError, match="unknown chunking strategy 'fast'"):
        evaluate_closed_loop(e2_run, "metaworld", None, episodes=1, progress=False, chunking=("sync", "fast"))


def test_cli_parses_the_sweep(tmp_path, monkeypatch):
    import fplus.eval.closed_loop
    from tests.helpers import run_cli

    seen = []

    def evaluate_closed_loop(run, sim, tasks, episodes, modes, *args, **kwargs):
        seen.append((kwargs["inference_delay"], kwargs["chunking"]))
        return {}, run / "eval" / "sim.json"

    monkeypatch.setattr(fplus.eval.closed_loop, "evaluate_closed_loop", evaluate_closed_loop)
    monkeypatch.setattr(fplus.eval.closed_loop, "results_table", lambda result: "table")
    base = ("eval", str(tmp_path), "--sim", "metaworld", "--episodes", "1", "--corrupted-episodes", "1")
    assert run_cli(*base).exit_code == 0
    out = run_cli(*base, "--inference-delay", "0, 2,4", "--chunking", "naive,rtc")
    assert out.exit_code == 0, out.output
    assert seen == [(0, "sync"), ((0, 2, 4), ("naive", "rtc"))]
    bad = run_cli(*base, "--chunking", "rtx")
    assert bad.exit_code == 1 and "unknown chunking strategy 'rtx' (did you mean rtc?)" in bad.stderr
    alone = run_cli("eval", str(tmp_path), "--inference-delay", "2")
    assert alone.exit_code == 1 and "add --sim" in alone.stderr


def test_a_damaged_latency_section_is_named_before_any_rollout(e2_run, monkeypatch):
    from fplus.eval.closed_loop import evaluate_closed_loop

    _, path = evaluate_closed_loop(e2_run, "metaworld", None, episodes=1, modes=("none",), progress=False)
    data = json.loads(path.read_text())
    data["latency"] = {"naive": {"2": {"tasks": {"reach-v3": {"successes": 1, "episodes": 1}}}}}
    path.write_text(json.dumps(data))
    monkeypatch.setattr("fplus.eval.closed_loop.rollout", lambda *a, **k: pytest.fail("rolled out"))
    with pytest.raises(ConfigError, match=r"its `latency` section is damaged \(naive/2, task reach-v3: a cell "
                                          r"needs episodes, idle_steps, smoothness, steps, successes\); delete it"):
        evaluate_closed_loop(e2_run, "metaworld", None, episodes=1, modes=("none",), progress=False)
