"""The wire format (openpi's msgpack-numpy) and the observation checks / key mapping of the policy server; no model."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from fplus.deploy.observation import ObservationError, ObservationSpec, parse_observation
from fplus.deploy.protocol import packb, unpackb
from fplus.settings import load_settings

# openpi-client 0.1.2's own round-trip cases (openpi_client/msgpack_numpy_test.py)
OPENPI_CASES = [
    1, 1.0, "hello", np.bool_(True), np.array([1, 2, 3])[0], np.str_("asdf"), [1, 2, 3], {"key": "value"},
    {"key": [1, 2, 3]}, np.array(1.0), np.array([1, 2, 3], dtype=np.int32), np.array(["asdf", "qwer"]),
    np.array([True, False]), np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32),
    np.array([[[1, 2], [3, 4]], [[5, 6], [7, 8]]], dtype=np.int16), np.array([np.nan, np.inf, -np.inf]),
    {"arr": np.array([1, 2, 3]), "nested": {"arr": np.array([4, 5, 6])}}, [np.array([1, 2]), np.array([3, 4])],
    np.zeros((3, 4, 5), dtype=np.float32), np.ones((2, 3), dtype=np.float64),
]


def _same(expected, actual) -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and expected.keys() == actual.keys()
        for k in expected:
            _same(expected[k], actual[k])
    elif isinstance(expected, list | tuple):
        assert len(expected) == len(actual)
        for e, a in zip(expected, actual, strict=True):
            _same(e, a)
    elif isinstance(expected, np.ndarray):
        assert expected.shape == actual.shape and expected.dtype == actual.dtype
        assert np.array_equal(expected, actual, equal_nan=expected.dtype.kind == "f")
    else:  # openpi's check; numpy scalars also keep their type (np.str_ is a str: msgpack packs it as one)
        assert expected == actual
        if isinstance(expected, np.generic) and not isinstance(expected, str):
            assert type(expected) is type(actual)


@pytest.mark.parametrize("data", OPENPI_CASES, ids=range(len(OPENPI_CASES)))
def test_pack_unpack_round_trip_of_openpis_cases(data):
    _same(data, unpackb(packb(data)))


def test_the_bytes_are_openpis_layout():
    """An array is a map of 4 bin-keyed entries: data (C-order bytes), dtype string, shape; a scalar of 3."""
    arr = np.array([[1, 2, 3]], dtype="<i2")
    expected = msgpack.packb({b"__ndarray__": True, b"data": b"\x01\x00\x02\x00\x03\x00", b"dtype": "<i2",
                              b"shape": (1, 3)})
    assert packb(arr) == expected
    assert packb(np.float32(0.5)) == msgpack.packb({b"__npgeneric__": True, b"data": 0.5, b"dtype": "<f4"})
    # unpacked arrays are read-only views of the message, as openpi's
    out = unpackb(expected)
    assert out.dtype == np.int16 and out.tolist() == [[1, 2, 3]] and not out.flags.writeable


@pytest.mark.parametrize("bad", [np.array([1 + 2j]), np.array([object()], dtype=object)])
def test_object_and_complex_arrays_are_refused_both_ways(bad):
    with pytest.raises(ValueError, match="Unsupported dtype"):
        packb(bad)
    crafted = msgpack.packb({b"__ndarray__": True, b"data": b"\0" * 16, b"dtype": bad.dtype.str, b"shape": (1,)})
    with pytest.raises(ValueError, match="Unsupported dtype"):
        unpackb(crafted)


SPEC = ObservationSpec(image_keys=("observation/image", "observation/wrist_image"), image_shape=(8, 8, 3),
                       state_key="observation/state", state_dim=3, prompt_key="prompt", action_dim=2, horizon=4)


def _obs(**changes):
    obs = {"observation/image": np.zeros((8, 8, 3), np.uint8), "observation/wrist_image": np.ones((8, 8, 3), np.uint8),
           "observation/state": np.array([0.5, 1.0, -2.0]), "prompt": "pick up the cup", "extra": "ignored"}
    obs.update(changes)
    return {k: v for k, v in obs.items() if v is not None}


def test_a_good_observation_maps_to_the_runs_inputs():
    obs = parse_observation(unpackb(packb(_obs())), SPEC, supports_prefix=False)
    assert [i.tolist() for i in obs.images] == [np.zeros((8, 8, 3)).tolist(), np.ones((8, 8, 3)).tolist()]
    assert all(i.dtype == np.uint8 and i.flags.writeable for i in obs.images)  # owned copies
    assert obs.state.dtype == np.float32 and obs.state.tolist() == [0.5, 1.0, -2.0] and obs.prompt == "pick up the cup"
    assert not obs.reset and not obs.observe_only and obs.prefix is None
    assert parse_observation(_obs(**{"observation/state": [1, 2, 3]}), SPEC, False).state.tolist() == [1, 2, 3]
    assert parse_observation(_obs(reset=np.bool_(True)), SPEC, False).reset
    # observe_only needs the main camera only
    only = parse_observation({"observation/image": np.zeros((8, 8, 3), np.uint8), "observe_only": True}, SPEC, False)
    assert only.observe_only and len(only.images) == 1 and only.prompt is None


@pytest.mark.parametrize("changes, message", [
    ({"observation/image": None}, r"the observation has no `observation/image` \(a uint8 image of shape \(8, 8, 3\)\); "
                                  r"its keys: .*observation/wrist_image.* \(map yours with SERVE_IMAGE_KEY"),
    ({"observation/wrist_image": None}, r"no `observation/wrist_image`"),
    ({"observation/state": None}, r"no `observation/state` \(the proprio state, 3 numbers\).*SERVE_STATE_KEY"),
    ({"prompt": None}, r"no `prompt` \(the task instruction\).*SERVE_PROMPT_KEY"),
    ({"prompt": "  "}, r"`prompt` must be a non-empty string"),
    ({"prompt": b"bytes"}, r"`prompt` must be a non-empty string .* got a bytes"),
    ({"observation/image": np.zeros((8, 8, 3), np.float32)},
     r"`observation/image` must be a uint8 image of shape \(8, 8, 3\), got an array of shape \(8, 8, 3\) and dtype "
     r"float32"),
    ({"observation/image": np.zeros((3, 8, 8), np.uint8)},
     r"`observation/image` has shape \(3, 8, 8\); the run was trained on frames of shape \(8, 8, 3\) \(channels first"),
    ({"observation/wrist_image": np.zeros((16, 16, 3), np.uint8)}, r"has shape \(16, 16, 3\).*resize on the client"),
    ({"observation/image": "a picture"}, r"got the string 'a picture'"),
    ({"observation/state": np.array([1.0, np.nan, 0.0])}, r"`observation/state` has non-finite values \(first at "
                                                          r"index \[1\]: nan\)"),
    ({"observation/state": np.array([1.0, 2.0, np.inf])}, r"non-finite values \(first at index \[2\]: inf\)"),
    ({"observation/state": np.zeros(4)}, r"`observation/state` must have shape \(3,\) \(the proprio state\), got "
                                         r"\(4,\)"),
    ({"observation/state": np.array([True, False, True])}, r"must be the proprio state: a real-valued array"),
    ({"observation/state": ["a", "b", "c"]}, r"a list that is not numbers"),
    ({"reset": 1}, r"`reset` must be true or false, got a int"),
    ({"observe_only": "yes"}, r"`observe_only` must be true or false"),
    ({"action_prefix": np.zeros((2, 2))}, r"this policy takes no `action_prefix` / `inference_delay`"),
])
def test_bad_observations_are_one_line_errors_naming_the_key(changes, message):
    with pytest.raises(ObservationError, match=message) as err:
        parse_observation(_obs(**changes), SPEC, supports_prefix=False)
    assert "\n" not in str(err.value)


def test_not_a_map_is_refused():
    with pytest.raises(ObservationError, match="an observation must be a map of keys to values, got a list"):
        parse_observation([1, 2], SPEC, False)


@pytest.mark.parametrize("changes, message", [
    ({"action_prefix": np.zeros((2, 2))}, r"`action_prefix` and `inference_delay` go together"),
    ({"inference_delay": 1}, r"go together"),
    ({"action_prefix": np.zeros((2, 3)), "inference_delay": 0}, r"`action_prefix` must have shape \(n, 2\)"),
    ({"action_prefix": np.zeros((5, 2)), "inference_delay": 0}, r"has 5 actions; it must have 1 to 4"),
    ({"action_prefix": np.zeros((0, 2)), "inference_delay": 0}, r"has 0 actions"),
    ({"action_prefix": np.full((2, 2), np.nan), "inference_delay": 0}, r"`action_prefix` has non-finite values"),
    ({"action_prefix": np.zeros((2, 2)), "inference_delay": 3}, r"`inference_delay` must be an integer from 0 to 2 "
                                                                r"\(the prefix length\), got 3"),
    ({"action_prefix": np.zeros((2, 2)), "inference_delay": 1.0}, r"`inference_delay` must be an integer .* got a "
                                                                  r"float"),
    ({"action_prefix": np.zeros((2, 2)), "inference_delay": True}, r"got a bool"),
    ({"action_prefix": np.zeros((2, 2)), "inference_delay": 1, "execution_horizon": 1},
     r"`execution_horizon` must be an integer from 2 to 3"),
])
def test_action_prefix_checks(changes, message):
    with pytest.raises(ObservationError, match=message):
        parse_observation(_obs(**changes), SPEC, supports_prefix=True)


def test_an_action_prefix_is_passed_on_when_supported():
    obs = parse_observation(_obs(action_prefix=np.array([[1, 2], [3, 4]]), inference_delay=np.int64(1),
                                 execution_horizon=2), SPEC, supports_prefix=True)
    assert obs.prefix.dtype == np.float32 and obs.prefix.tolist() == [[1, 2], [3, 4]]
    assert obs.delay == 1 and type(obs.delay) is int and obs.horizon == 2


def test_the_keys_come_from_the_serve_settings():
    defaults = load_settings(None, {}, environ={}, dotenv=None).serve
    assert (defaults.host, defaults.port, defaults.image_key, defaults.wrist_image_key, defaults.state_key,
            defaults.prompt_key, defaults.max_message_mb) == (
        "127.0.0.1", 8000, "observation/image", "observation/wrist_image", "observation/state", "prompt", 16.0)
    mine = load_settings(None, {}, environ={"SERVE_IMAGE_KEY": "cam_high", "SERVE_PROMPT_KEY": "task",
                                            "SERVE_PORT": "9000"}, dotenv=None).serve
    assert (mine.image_key, mine.prompt_key, mine.port) == ("cam_high", "task", 9000)
    from fplus.errors import ConfigError

    with pytest.raises(ConfigError, match="SERVE_PORT"):
        load_settings(None, {"SERVE_PORT": "70000"}, environ={}, dotenv=None)
