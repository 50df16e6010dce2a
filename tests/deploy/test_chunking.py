"""The chunk scheduler (fplus.deploy.chunking) with fake policies: a chunk requested at step r from observation r is
[[100 r + j] for j in 0..H-1], so every executed action says which request it came from and which index it is."""

from __future__ import annotations

import numpy as np
import pytest

from fplus.deploy.chunking import (
    STRATEGIES,
    ChunkScheduler,
    SimulatedInference,
    Smoothness,
    check_timing,
    parse_delays,
    parse_strategies,
    settings_grid,
    timeline,
)
from fplus.errors import ConfigError


class FakePolicy:
    """policy_fn(obs, prefix, delay): the observation is the control step; records every call. `inpaint`: the
    chunk's first `delay` actions are the prefix's (what a perfect RTC inpainting reproduces)."""

    def __init__(self, horizon: int, inpaint: bool = False):
        self.horizon, self.inpaint, self.calls = horizon, inpaint, []

    def __call__(self, obs, prefix, delay):
        self.calls.append((obs, None if prefix is None else prefix.copy(), delay))
        chunk = (100.0 * obs + np.arange(self.horizon, dtype=np.float64))[:, None]
        if self.inpaint and prefix is not None:
            chunk[:delay] = prefix[:delay]
        return chunk


def run(strategy: str, horizon: int, s: int, d: int, steps: int, inpaint: bool = False):
    """Drive the scheduler for `steps` control steps (obs = the step): (executed actions (steps,), runner, policy)."""
    policy = FakePolicy(horizon, inpaint)
    runner = SimulatedInference(policy, s, d, strategy, horizon)
    actions = [runner.act(t)[0] for t in range(steps)]
    return np.array(actions), runner, policy


def plain_chunking(horizon: int, s: int, steps: int) -> np.ndarray:
    """The closed loop before the scheduler: predict a chunk from the current observation, execute its first s."""
    policy, out = FakePolicy(horizon), []
    while len(out) < steps:
        out += list(policy(len(out), None, 0)[:s, 0])
    return np.array(out[:steps])


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(("horizon", "s"), [(8, 4), (4, 2), (4, 4), (5, 1), (1, 1)])
def test_with_no_delay_every_strategy_executes_plain_synchronous_chunking(strategy, horizon, s):
    actions, runner, policy = run(strategy, horizon, s, 0, 23)
    np.testing.assert_array_equal(actions, plain_chunking(horizon, s, 23))
    assert [obs for obs, _, _ in policy.calls] == list(range(0, 23, s))  # a request every s steps, from o_t
    assert runner.scheduler.idle_steps == 0
    assert all(delay == 0 for _, _, delay in policy.calls)


def test_the_hand_computed_timeline():
    """H = 8, s = 4, d = 2 (the module doc's table)."""
    expected = [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (1, 2), (1, 3), (1, 4), (1, 5), (2, 2), (2, 3),
                (2, 4), (2, 5)]
    assert timeline("naive", 8, 4, 2, 14) == expected
    assert timeline("rtc", 8, 4, 2, 14) == expected
    assert timeline("sync", 8, 4, 2, 14) == [(k, i) for k in range(4) for i in range(4)][:14]
    actions, runner, _ = run("naive", 8, 4, 2, 14)
    # chunk 1 was requested at step 4 (from o_4), chunk 2 at step 8: action t of chunk r is 100 r + (t - r)
    assert actions.tolist() == [0, 1, 2, 3, 4, 5, 402, 403, 404, 405, 802, 803, 804, 805]
    assert [(r.step, r.arrives) for r in runner.scheduler.requests] == [(0, 0), (4, 6), (8, 10), (12, 14)]


@pytest.mark.parametrize(("horizon", "s", "d"), [(8, 4, 2), (8, 4, 4), (8, 3, 1), (10, 5, 5), (6, 2, 1)])
def test_naive_switches_when_the_chunk_arrives_and_skips_its_first_d_actions(horizon, s, d):
    actions, runner, policy = run("naive", horizon, s, d, 40)
    requests = runner.scheduler.requests
    assert [r.step for r in requests] == [0, *range(s, 40, s)][:len(requests)]
    assert all(prefix is None and delay == 0 for _, prefix, delay in policy.calls)  # no inpainting
    for t, a in enumerate(actions):
        if t < s + d:  # the first chunk (waited for) runs until the second arrives
            assert a == t
        else:  # then chunk k (requested at k s) from step k s + d, at index t - k s >= d
            r = ((t - d) // s) * s
            assert a == 100 * r + (t - r) and t - r >= d
    switches = [t for t in range(1, 40) if runner.scheduler.timeline[t][0] != runner.scheduler.timeline[t - 1][0]]
    assert switches == list(range(s + d, 40, s))
    assert {i for t, (_, i) in enumerate(runner.scheduler.timeline) if t in switches} == {d}


def test_rtc_without_delay_is_plain_inference():
    """d = 0: nothing runs during inference, so rtc sends no prefix and executes exactly what sync executes."""
    actions, runner, policy = run("rtc", 8, 4, 0, 40, inpaint=True)
    assert all(prefix is None and delay == 0 for _, prefix, delay in policy.calls)
    assert np.array_equal(np.asarray(actions), np.asarray(run("sync", 8, 4, 0, 40, inpaint=True)[0]))


@pytest.mark.parametrize(("horizon", "s", "d"), [(8, 4, 2), (8, 4, 4), (8, 3, 1), (6, 2, 1)])
def test_rtc_passes_the_overlap_and_executes_its_frozen_prefix_exactly(horizon, s, d):
    actions, runner, policy = run("rtc", horizon, s, d, 40, inpaint=True)
    calls = policy.calls
    assert calls[0][1] is None and calls[0][2] == 0  # the first chunk has nothing to continue
    for (obs, prefix, delay), request in zip(calls[1:], runner.scheduler.requests[1:], strict=True):
        assert delay == d and obs == request.step
        # the prefix: the current chunk's plan from this step on (H - s actions), prefix[i] meant for step obs + i
        assert prefix.shape == (horizon - s, 1)
        current = obs - s  # the current chunk was requested s steps ago
        np.testing.assert_array_equal(prefix[:, 0], 100.0 * current + np.arange(s, horizon))
        # its first d actions are exactly what runs while the new chunk is inferred
        np.testing.assert_array_equal(actions[obs:obs + d], prefix[:d, 0])
    # with a perfect inpainting, the new chunk's frozen actions equal the executed ones, so across every boundary
    # the executed actions are those the new chunk plans for those steps
    for request in runner.scheduler.requests[1:]:
        r = request.step
        if r + s + d <= 40:
            new_chunk = FakePolicy(horizon, inpaint=True)(r, calls[request.chunk][1], d)
            np.testing.assert_array_equal(actions[r:r + d], new_chunk[:d, 0])
            np.testing.assert_array_equal(actions[r + d:r + s + d], new_chunk[d:s + d, 0])


def test_rtc_with_the_whole_chunk_executed_has_no_prefix():
    _, _, policy = run("rtc", 4, 4, 0, 12)
    assert [(obs, prefix, delay) for obs, prefix, delay in policy.calls] == [(0, None, 0), (4, None, 0),
                                                                            (8, None, 0)]


@pytest.mark.parametrize("d", [1, 3, 7])
def test_sync_with_a_delay_executes_the_chunks_of_no_delay_and_counts_the_wait(d):
    """In a simulator sync does not step the env during inference: the same actions as d = 0, and d idle steps
    per request (the time a robot would stand still)."""
    actions, runner, policy = run("sync", 8, 4, d, 21)
    np.testing.assert_array_equal(actions, plain_chunking(8, 4, 21))
    assert [obs for obs, _, _ in policy.calls] == [0, 4, 8, 12, 16, 20]
    assert runner.scheduler.idle_steps == 6 * d and runner.scheduler.step == 21
    assert all(prefix is None and delay == 0 for _, prefix, delay in policy.calls)


@pytest.mark.parametrize("strategy", ["naive", "rtc"])
def test_only_the_first_chunk_is_waited_for_without_sync(strategy):
    _, runner, _ = run(strategy, 8, 4, 3, 30)
    assert runner.scheduler.idle_steps == 3


def test_a_robot_drives_the_scheduler_by_hand():
    """Real-robot use: inference returns when it returns. sync holds (the clock stands still); naive holds when a
    late chunk outlasts the current one and then joins the plan at the real step."""
    sync = ChunkScheduler(execution_horizon=2, strategy="sync")
    assert sync.needs_request() and sync.request().step == 0
    assert sync.next_action() is None and sync.step == 0 and sync.idle_steps == 1
    sync.submit(np.array([[1.0], [2.0], [3.0]]))
    assert [sync.next_action()[0] for _ in range(2)] == [1.0, 2.0] and sync.needs_request()
    sync.request()
    assert sync.next_action() is None and sync.step == 2  # waiting for the second chunk: no step passes
    sync.submit(np.array([[5.0], [6.0], [7.0]]))
    assert sync.next_action()[0] == 5.0

    naive = ChunkScheduler(execution_horizon=2, inference_delay=1, strategy="naive", horizon=3)
    naive.request()
    naive.submit(np.array([[0.0], [1.0], [2.0]]))
    assert [naive.next_action()[0] for _ in range(2)] == [0.0, 1.0]
    req = naive.request()
    assert (req.step, req.arrives, req.prefix) == (2, 3, None)
    assert naive.next_action()[0] == 2.0 and naive.next_action() is None  # the chunk is late: hold, time runs on
    assert naive.step == 4 and not naive.needs_request()
    naive.submit(np.array([[20.0], [21.0], [22.0]]))
    assert naive.next_action()[0] == 22.0  # requested at step 2, now step 4: index 2
    with pytest.raises(ConfigError, match="chunk of 2 actions; this scheduler runs chunks of H=3"):
        naive.request()
        naive.submit(np.zeros((2, 1)))


def test_smoothness_at_boundaries_and_within_chunks():
    """Hand-computed: chunks [0, 1, 2, 3] then (requested at step 2, delay 0, s = 2) [10, 11, 12, 13]."""
    chunks = iter([np.array([[0.0, 0.0], [1.0, 3.0], [2.0, 2.0], [3.0, 3.0]]),
                   np.array([[10.0, 10.0], [11.0, 11.0], [12.0, 14.0], [13.0, 13.0]])])
    runner = SimulatedInference(lambda obs, prefix, delay: next(chunks), 2, 0, "naive", 4)
    executed = [runner.act(t) for t in range(4)]
    assert np.array(executed).tolist() == [[0, 0], [1, 3], [10, 10], [11, 11]]
    sm = runner.scheduler.smoothness
    # within: |1-0|,|3-0| -> 2; |11-10|,|11-10| -> 1; boundary: |10-1|,|10-3| -> 8
    assert (sm.within, sm.within_transitions, sm.boundary, sm.boundary_transitions) == (1.5, 2, 8.0, 1)
    pooled = sm + Smoothness.from_json(sm.to_json())
    assert pooled.to_json() == {"boundary": 8.0, "within": 1.5, "boundary_transitions": 2, "within_transitions": 4}
    assert Smoothness().to_json() == {"boundary": None, "within": None, "boundary_transitions": 0,
                                      "within_transitions": 0}


@pytest.mark.parametrize(("strategy", "h", "s", "d", "message"), [
    ("naive", 8, 4, 5, r"inference delay d=5 is longer than the execution horizon s=4"),
    ("rtc", 8, 6, 3, r"s \+ d = 9, but chunks hold H=8 actions \(RTC's d <= H - s: use d <= 2"),
    ("sync", 4, 5, 0, r"execution horizon s=5 .* between 1 and the chunk length H=4"),
    ("naive", 4, 0, 0, r"execution horizon s=0"),
    ("rtc", 4, 2, -1, r"inference delay d=-1 must be 0 or more"),
    ("rtcc", 4, 2, 0, r"unknown chunking strategy 'rtcc' \(did you mean rtc\?\); valid: sync, naive, rtc"),
])
def test_timings_that_cannot_run_are_config_errors(strategy, h, s, d, message):
    with pytest.raises(ConfigError, match=message):
        check_timing(strategy, h, s, d)
    with pytest.raises(ConfigError, match=message):
        ChunkScheduler(s, d, strategy, horizon=h)


def test_sync_accepts_any_delay_and_the_horizon_may_come_with_the_first_chunk():
    check_timing("sync", 4, 4, 9)  # sync waits: the delay never eats into the chunk
    lazy = ChunkScheduler(execution_horizon=3, inference_delay=2, strategy="rtc")
    lazy.request()
    with pytest.raises(ConfigError, match=r"s \+ d = 5, but chunks hold H=4"):
        lazy.submit(np.zeros((4, 2)))


def test_option_lists():
    assert parse_delays("0, 2,4,2") == (0, 2, 4)
    assert parse_strategies("rtc,sync") == ("rtc", "sync")
    assert settings_grid(["rtc", "sync"], [4, 0]) == [("sync", 0), ("sync", 4), ("rtc", 0), ("rtc", 4)]
    with pytest.raises(ConfigError, match=r"--inference-delay: 'two' is not valid"):
        parse_delays("0,two")
    with pytest.raises(ConfigError, match=r"--chunking: give at least one value"):
        parse_strategies(" , ")
    with pytest.raises(ConfigError, match="did you mean naive"):
        parse_strategies("sync,naiv")
