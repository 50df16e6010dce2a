import numpy as np
import pytest

from fplus.data.split import Split, split_episodes
from fplus.data.windows import episode_bounds, sample_windows
from fplus.errors import FplusError


def test_windows_clamp_and_mask_at_episode_bounds():
    # one episode in rows [10, 15): frames 10..14
    t = np.array([10, 12, 14])
    w = sample_windows(t, np.full(3, 10), np.full(3, 15), horizon=4, history=3, future=2)
    np.testing.assert_array_equal(w.action, [[10, 11, 12, 13], [12, 13, 14, 14], [14, 14, 14, 14]])
    np.testing.assert_array_equal(w.action_pad, [[0, 0, 0, 0], [0, 0, 0, 1], [0, 1, 1, 1]])
    np.testing.assert_array_equal(w.history, [[10, 10, 10], [10, 11, 12], [12, 13, 14]])
    np.testing.assert_array_equal(w.future, [[11, 12], [13, 14], [14, 14]])
    np.testing.assert_array_equal(w.future_valid, [[1, 1], [1, 1], [0, 0]])


def test_windows_never_leave_the_episode():
    episode = np.repeat(np.arange(5), [3, 1, 7, 2, 9])
    start, stop = episode_bounds(episode)
    t = np.arange(len(episode))
    w = sample_windows(t, start, stop, horizon=5, history=4, future=3)
    for arr in (w.action, w.history, w.future):
        assert np.all(episode[arr] == episode[t][:, None])
    assert w.history[:, -1].tolist() == t.tolist()
    # the closed form, frame by frame: a[t+h] clamped to the episode's last row and padded past it, z[t-T+1+j]
    # clamped to its first row, z[t+1+k] clamped to the last row and invalid past it
    for i, (ti, a, b) in enumerate(zip(t, start, stop, strict=True)):
        assert w.action[i].tolist() == [min(ti + h, b - 1) for h in range(5)]
        assert w.action_pad[i].tolist() == [ti + h >= b for h in range(5)]
        assert w.history[i].tolist() == [max(ti - 3 + j, a) for j in range(4)]
        assert w.future[i].tolist() == [min(ti + 1 + k, b - 1) for k in range(3)]
        assert w.future_valid[i].tolist() == [ti + 1 + k < b for k in range(3)]
    # the single-frame episode 1 (row 3): every window is that frame, every action step but the first padded
    assert w.action[3].tolist() == [3] * 5 and w.action_pad[3].tolist() == [False] + [True] * 4
    assert w.future_valid[3].tolist() == [False] * 3


def test_frame_outside_its_episode_is_rejected():
    with pytest.raises(ValueError, match="inside its episode"):
        sample_windows(np.array([5]), np.array([0]), np.array([5]), 2, 2, 2)


def test_episode_bounds():
    start, stop = episode_bounds(np.array([0, 0, 1, 1, 1, 2]))
    assert start.tolist() == [0, 0, 2, 2, 2, 5] and stop.tolist() == [2, 2, 5, 5, 5, 6]
    with pytest.raises(ValueError, match="contiguous"):
        episode_bounds(np.array([0, 1, 0]))


def test_split_by_episode_is_seeded_disjoint_and_saved(tmp_path):
    s = split_episodes(list(range(20)), 0.1, seed=3)
    assert len(s.val) == 2 and len(s.train) == 18 and not set(s.train) & set(s.val)
    assert s == split_episodes(list(range(20)), 0.1, seed=3)
    assert s.val != split_episodes(list(range(20)), 0.1, seed=4).val
    s.save(tmp_path / "split.json")
    assert Split.load(tmp_path / "split.json") == s
    with pytest.raises(FplusError, match="VAL_FRACTION"):
        split_episodes([0], 0.5, seed=0)
