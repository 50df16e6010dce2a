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
