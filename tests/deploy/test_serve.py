"""The policy server on a tiny trained E2 run, through a plain `websockets` client (no openpi venv needed):
metadata, actions equal to the in-process policy bit for bit, episodes (reset, new connection, observe_only), errors
as text frames with the connection and its episode kept, size limits, several clients at once, real-time chunking,
the health check, and `fplus serve` in a subprocess stopped by SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import urllib.request
from contextlib import contextmanager

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from fplus.deploy.protocol import packb, unpackb
from fplus.deploy.runner import load_runner
from fplus.deploy.server import PolicyServer, ServerThread
from fplus.settings import load_settings
from tests.deploy.serve_helpers import PROMPTS, ServeProcess, toy_observation
from tests.helpers import run_cli

LIMIT_MB = 0.1  # an observation is ~12.4 kB; over 0.1 MB an error reply, over 0.2 MB the connection is closed


@pytest.fixture(scope="module")
def server(served_run):
    runner = load_runner(served_run.dir, None, "cpu", load_settings(None, {}, environ={}, dotenv=None).serve)
    log: list[str] = []
    policy_server = PolicyServer(runner, "127.0.0.1", 0, LIMIT_MB, log=log.append)
    with ServerThread(policy_server) as (host, port):
        policy_server.url, policy_server.lines = f"ws://{host}:{port}", log
        yield policy_server


@contextmanager
def _client(server):
    """A connection (as openpi's client opens it) and the metadata the server sent first."""
    with connect(server.url, compression=None, max_size=None, open_timeout=30) as ws:
        yield ws, unpackb(ws.recv(timeout=30))


def _infer(ws, obs: dict):
    ws.send(packb(obs))
    reply = ws.recv(timeout=60)
    return reply if isinstance(reply, str) else unpackb(reply)


def test_metadata_on_connect_then_the_in_process_policys_actions(server, served_run):
    with _client(server) as (ws, meta):
        assert meta["server"] == "fplus" and meta["experiment"] == "E2" and meta["step"] == 2
        assert (meta["action_horizon"], meta["action_dim"], meta["state_dim"], meta["world_memory"]) == (4, 2, 2, True)
        assert meta["observation"]["images"] == {"observation/image": [64, 64, 3]}
        assert meta["observation"]["state"] == {"observation/state": [2]} and meta["observation"]["prompt"] == "prompt"
        assert meta["max_message_mb"] == LIMIT_MB and meta["tasks"] == list(PROMPTS)
        episode = [toy_observation(t) for t in range(4)]
        replies = [_infer(ws, obs) for obs in episode]
    expected = served_run.reference(episode)
    for t, (reply, want) in enumerate(zip(replies, expected, strict=True)):
        assert reply["actions"].dtype == np.float32 and reply["actions"].shape == (4, 2)
        assert np.array_equal(reply["actions"], want), t  # the same code path in this process: bit for bit
        assert reply["episode_step"] == t
        assert set(reply["server_timing"]) == ({"infer_ms", "queue_ms"} | ({"prev_total_ms"} if t else set()))
        assert reply["server_timing"]["infer_ms"] >= reply["policy_timing"]["infer_ms"] > 0
    # the test has teeth: the world-latent history changes the actions (the same frame alone gives others)
    assert np.abs(expected[3] - served_run.reference(episode[3:])[0]).max() > 1e-4


def test_reset_and_a_new_connection_start_a_new_episode(server, served_run):
    with _client(server) as (ws, _):
        _infer(ws, toy_observation(0))
        _infer(ws, toy_observation(1))
        reset = _infer(ws, toy_observation(2, reset=True))
        after = _infer(ws, toy_observation(3))
    assert reset["episode_step"] == 0
    assert np.array_equal(reset["actions"], served_run.reference([toy_observation(2)])[0])
    assert after["episode_step"] == 1
    assert np.array_equal(after["actions"], served_run.reference([toy_observation(2), toy_observation(3)])[1])
    with _client(server) as (ws, _):  # a new connection: a new episode
        first = _infer(ws, toy_observation(3))
    assert first["episode_step"] == 0 and np.array_equal(first["actions"],
                                                         served_run.reference([toy_observation(3)])[0])


def test_observe_only_frames_enter_the_history(server, served_run):
    with _client(server) as (ws, _):
        seen = _infer(ws, {"observation/image": toy_observation(0)["observation/image"], "observe_only": True})
        reply = _infer(ws, toy_observation(1))
    assert seen == {"episode_step": 0, "server_timing": seen["server_timing"]}
    assert reply["episode_step"] == 1
    episode = [toy_observation(0, observe_only=True), toy_observation(1)]
    assert np.array_equal(reply["actions"], served_run.reference(episode)[0])


def test_bad_observations_get_a_one_line_text_error_and_the_episode_goes_on(server, served_run):
    good = toy_observation(0)
    image = good["observation/image"]
    bad = {
        "missing key": ({k: v for k, v in good.items() if k != "observation/state"},
                        "error: the observation has no `observation/state` (the proprio state, 2 numbers)"),
        "wrong dtype": ({**good, "observation/image": image.astype(np.float32)},
                        "error: `observation/image` must be a uint8 image of shape (64, 64, 3), got an array of "
                        "shape (64, 64, 3) and dtype float32"),
        "wrong shape": ({**good, "observation/image": image[:32]},
                        "error: `observation/image` has shape (32, 64, 3); the run was trained on frames of shape "
                        "(64, 64, 3)"),
        "non-finite": ({**good, "observation/state": np.array([1.0, np.inf])},
                       "error: `observation/state` has non-finite values (first at index [1]: inf)"),
        "oversized": ({**good, "padding": b"\0" * 150_000},
                      "error: the message has 0.2 MB; this server accepts at most 0.1 MB (SERVE_MAX_MESSAGE_MB)"),
        "not a map": ([1, 2, 3], "error: an observation must be a map of keys to values, got a list"),
    }
    with _client(server) as (ws, _):
        first = _infer(ws, good)
        for name, (message, error) in bad.items():
            reply = _infer(ws, message)
            assert isinstance(reply, str) and reply.startswith(error) and "\n" not in reply, (name, reply)
        ws.send(b"\xc1 not msgpack")
        assert ws.recv().startswith("error: cannot decode the message as msgpack-numpy (openpi's protocol)")
        ws.send("a text frame")
        assert ws.recv().startswith("error: expected a binary frame holding a msgpack-numpy map")
        then = _infer(ws, toy_observation(1))
    # none of the bad observations entered the episode
    assert first["episode_step"] == 0 and then["episode_step"] == 1
    assert np.array_equal(then["actions"], served_run.reference([good, toy_observation(1)])[1])
    assert any("error: `observation/state` has non-finite values" in line for line in server.lines)


def test_a_message_over_twice_the_limit_closes_only_that_connection(server, served_run):
    with _client(server) as (ws, _), _client(server) as (other, _):
        ws.send(packb({**toy_observation(0), "padding": b"\0" * 250_000}))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
        assert closed.value.rcvd.code == 1009  # message too big
        assert np.array_equal(_infer(other, toy_observation(0))["actions"],
                              served_run.reference([toy_observation(0)])[0])


def test_two_clients_at_once_keep_their_own_episodes(server, served_run):
    episodes = {c: [toy_observation(t + 5 * c, PROMPTS[c]) for t in range(3)] for c in (0, 1)}
    replies: dict[int, list] = {0: [], 1: []}
    barrier = threading.Barrier(2, timeout=60)

    def client(c: int) -> None:
        with _client(server) as (ws, _):
            for obs in episodes[c]:
                barrier.wait()  # both observations in flight together
                replies[c].append(_infer(ws, obs))

    threads = [threading.Thread(target=client, args=(c,)) for c in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for c in (0, 1):
        expected = served_run.reference(episodes[c])
        assert [r["episode_step"] for r in replies[c]] == [0, 1, 2]
        for reply, want in zip(replies[c], expected, strict=True):
            assert np.array_equal(reply["actions"], want)


def test_an_internal_error_closes_that_connection_only(server, served_run, monkeypatch):
    infer = server.runner.infer

    def failing(episode, obs):
        if obs.prompt == "fail":
            raise RuntimeError("boom")
        return infer(episode, obs)

    monkeypatch.setattr(server.runner, "infer", failing)
    with _client(server) as (ws, _), _client(server) as (other, _):
        reply = _infer(ws, toy_observation(0, prompt="fail"))
        assert reply.startswith("error (internal, RuntimeError): boom; the server closes this connection")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
        assert closed.value.rcvd.code == 1011
        assert np.array_equal(_infer(other, toy_observation(0))["actions"],
                              served_run.reference([toy_observation(0)])[0])


def test_an_action_prefix_is_inpainted(server, served_run):
    assert server.runner.supports_prefix and server.runner.metadata()["action_prefix"] is True
    prefix = np.array([[0.25, -1.5], [2.0, 0.5]])
    with _client(server) as (ws, _):
        _infer(ws, toy_observation(0))
        reply = _infer(ws, toy_observation(1, action_prefix=prefix, inference_delay=1))
        bad = _infer(ws, toy_observation(2, action_prefix=prefix, inference_delay=3))
    assert np.array_equal(reply["actions"][:1], prefix[:1].astype(np.float32))  # the frozen actions, bit for bit
    episode = [toy_observation(0), toy_observation(1, action_prefix=prefix, inference_delay=1)]
    assert np.array_equal(reply["actions"], served_run.reference(episode)[1])
    assert bad.startswith("error: `inference_delay` must be an integer from 0 to 2")


def test_health_check(server):
    with urllib.request.urlopen(server.url.replace("ws://", "http://") + "/healthz", timeout=30) as response:
        assert response.status == 200 and response.read() == b"OK\n"


def test_fplus_serve_binds_localhost_and_stops_cleanly_on_sigterm(served_run, tmp_path):
    with ServeProcess(served_run.dir, "--device", "cpu", cwd=tmp_path) as proc:
        assert proc.host == "127.0.0.1"  # SERVE_HOST's default
        with connect(f"ws://{proc.host}:{proc.port}", compression=None, max_size=None, open_timeout=30) as ws:
            assert unpackb(ws.recv())["experiment"] == "E2"
            reply = _infer(ws, toy_observation(0))
            np.testing.assert_allclose(reply["actions"], served_run.reference([toy_observation(0)])[0], atol=1e-5,
                                       rtol=0)  # another process: see test_serve_openpi.py
            code = proc.stop(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=30)
            assert closed.value.rcvd.code == 1001  # going away
    assert code == 0, "\n".join(proc.lines)
    assert proc.lines[-1] == "stopped (SIGTERM) after 1 connection(s)"
    assert any("connected" in line for line in proc.lines)


def test_fplus_serve_errors_are_one_line(tmp_path):
    result = run_cli("serve", tmp_path / "nope")
    assert result.exit_code == 1
    assert f"error: {tmp_path / 'nope'} does not exist (expected a run directory" in result.stderr
    result = run_cli("serve", tmp_path, "--port", "70000")
    assert result.exit_code == 2 and "Invalid value for '--port'" in result.stderr and "65535" in result.stderr


def test_fplus_serve_help_imports_nothing_heavy():
    code = ("import sys\nfrom typer.main import get_command\nfrom fplus.cli.main import app\n"
            "get_command(app).main(['serve', '--help'], prog_name='fplus', standalone_mode=False)\n"
            "heavy = ('torch', 'transformers', 'websockets', 'msgpack', 'numpy')\n"
            "print(','.join(m for m in heavy if m in sys.modules), file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0 and "--port" in out.stdout and "SERVE_HOST" in out.stdout, out.stderr
    assert out.stderr.strip() == ""


def test_a_flow_head_samples_from_the_episodes_own_noise(tmp_path):
    """Flow head: the noise of an episode comes from its own generator (seeded 0 at its start), so two clients with
    the same observations get the same chunks whatever the order, equal to this process's with that generator."""
    import torch
    from accelerate.state import AcceleratorState, PartialState

    from fplus import batch as K
    from fplus.deploy.episode import observation_batch
    from fplus.rundir import run_dir_for
    from fplus.train.run import train_run
    from tests.helpers import toy_settings, write_toy_dataset

    write_toy_dataset(tmp_path / "ds", lengths=(8, 7, 9, 6))
    s = toy_settings(tmp_path, tmp_path / "ds", EXPERIMENT="E0", MAX_STEPS=1, VAL_FRACTION=0.25, ACTION_HEAD="flow",
                     FLOW_WIDTH=32, FLOW_HEADS=2, FLOW_LAYERS=1, FLOW_TIME_DIM=16, FLOW_STEPS=3)
    train_run(s, run_dir_for(s), progress_bar=False)
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    runner = load_runner(run_dir_for(s), None, "cpu", load_settings(None, {}, environ={}, dotenv=None).serve)
    episode = [toy_observation(t) for t in range(3)]
    with ServerThread(PolicyServer(runner, "127.0.0.1", 0)) as (host, port):
        url = f"ws://{host}:{port}"
        with connect(url, compression=None) as one, connect(url, compression=None) as two:
            one.recv(), two.recv()
            first = [_infer(one, episode[0]), _infer(two, episode[0]), _infer(two, episode[1]),
                     _infer(one, episode[1]), _infer(one, {**episode[2], "reset": True})]
    generator = torch.Generator().manual_seed(0)
    expected = []
    for obs in episode[:2]:
        raw = {"image": obs["observation/image"], "state": obs["observation/state"].astype(np.float32)}
        batch = runner.policy.processor(observation_batch(raw, ("image",), obs["prompt"], True))
        assert K.Z_HIST not in batch
        expected.append(runner.policy.predict(batch, generator=generator).actions[0].numpy())
    assert not np.array_equal(expected[0], expected[1])  # the noise advances within an episode
    got = [r["actions"] for r in first]
    assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[0])
    assert np.array_equal(got[2], expected[1]) and np.array_equal(got[3], expected[1])
    restarted = runner.policy.processor(observation_batch(
        {"image": episode[2]["observation/image"], "state": episode[2]["observation/state"].astype(np.float32)},
        ("image",), episode[2]["prompt"], True))
    assert np.array_equal(got[4], runner.policy.predict(restarted, generator=torch.Generator().manual_seed(0))
                          .actions[0].numpy())  # reset: the generator starts again
