"""`fplus serve` against openpi's real client (openpi-client 0.1.2 in its own venv: it pins numpy<2, fplus needs numpy
2; build it with `bash scripts/openpi_client_env.sh`, FPLUS_OPENPI_VENV names it, default .openpi-venv).

A tiny E2 run is served by `fplus serve` in a subprocess; a script in the openpi venv drives
`openpi_client.websocket_client_policy.WebsocketClientPolicy` unchanged: metadata, an episode, a reset, a bad
observation (openpi's client raises RuntimeError on the text frame) then a good one on the same connection, and two
clients at once. Their actions are compared with this process's policy on the same observations.

Tolerance: the server is another process running the same code on the same weights and inputs, so the actions agree
to float32 rounding; CPU GEMM kernels may split reductions differently between processes (thread pools, ISA
dispatch), so `atol=1e-5` (the actions are O(1): ~100 float32 ulps) rather than bit equality. What the test must
catch is far larger: a frame missing from or added to the world-latent history changes the actions by > 1e-4
(asserted in test_serve.py), a wrong camera, state or prompt by more.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fplus.deploy.protocol import packb
from tests.deploy.serve_helpers import PROMPTS, ServeProcess, toy_observation

REPO = Path(__file__).resolve().parents[2]
OPENPI_VENV = Path(os.environ.get("FPLUS_OPENPI_VENV", REPO / ".openpi-venv"))
pytestmark = pytest.mark.skipif(not (OPENPI_VENV / "bin/python").exists(),
                                reason=f"no openpi client venv at {OPENPI_VENV} (build it: bash "
                                       "scripts/openpi_client_env.sh, or set FPLUS_OPENPI_VENV)")
ATOL = 1e-5

# evaluated on both sides: openpi's packer (numpy 1.26) and fplus's (numpy 2) must write the same bytes
CASES = """[1, 1.0, "hello", np.bool_(True), np.int64(3), np.float32(0.5), [1, 2, 3], {"key": [1, 2, 3]},
 np.array(1.0), np.array([1, 2, 3], dtype=np.int32), np.array([True, False]), np.array(["asdf", "qwer"]),
 np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32), np.array([np.nan, np.inf, -np.inf]),
 {"observation/image": np.arange(48, dtype=np.uint8).reshape(4, 4, 3), "prompt": "pick"}]"""

CLIENT = textwrap.dedent('''
    import json, sys, threading
    import numpy as np
    from openpi_client import msgpack_numpy
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    mode = sys.argv[1]
    if mode == "pack":
        print(json.dumps([msgpack_numpy.packb(v).hex() for v in eval(sys.argv[2], {"np": np})]))
        sys.exit(0)
    host, port, inputs, out = sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
    arrays, plan = np.load(inputs + ".npz"), json.load(open(inputs + ".json"))

    def obs(name):
        o = {"observation/image": arrays[name + "_image"], "observation/state": arrays[name + "_state"],
             **plan["extra"][name]}
        return o

    results, report = {}, {}
    client = WebsocketClientPolicy(host, port)
    report["metadata"] = client.get_server_metadata()
    for name in plan["episode"]:  # an episode, then a reset
        reply = client.infer(obs(name))
        results[name] = reply["actions"]
        report.setdefault("timing", []).append(sorted(reply["server_timing"]))
    try:
        client.infer({**obs("bad"), "observation/image": arrays["bad_image"].astype(np.float32)})
    except RuntimeError as err:
        report["error"] = str(err)
    results["after_error"] = client.infer(obs("after_error"))["actions"]

    barrier = threading.Barrier(2)
    def run(names):
        other = WebsocketClientPolicy(host, port)  # its own connection: its own episode
        for name in names:
            barrier.wait()
            results[name] = other.infer(obs(name))["actions"]
    threads = [threading.Thread(target=run, args=(names,)) for names in plan["concurrent"]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.savez(out + ".npz", **results)
    json.dump(report, open(out + ".json", "w"))
''')


def _openpi(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(OPENPI_VENV / "bin/python"), "-c", CLIENT, *args], capture_output=True, text=True,
                          timeout=timeout, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})


def test_openpis_packer_writes_the_same_bytes():
    done = _openpi("pack", CASES)
    assert done.returncode == 0, done.stderr
    ours = [packb(v).hex() for v in eval(CASES, {"np": np})]  # noqa: S307 -- our own literal
    assert json.loads(done.stdout) == ours


def test_openpi_client_against_fplus_serve(served_run, tmp_path):
    # episode: a0 a1 a2, then a3 starts a new episode (reset); after_error continues it on the same connection
    observations = {"a0": toy_observation(0), "a1": toy_observation(1), "a2": toy_observation(2),
                    "a3": toy_observation(7, reset=True), "bad": toy_observation(8), "after_error": toy_observation(8),
                    "b0": toy_observation(3, PROMPTS[1]), "b1": toy_observation(4, PROMPTS[1]),
                    "c0": toy_observation(10), "c1": toy_observation(11)}
    np.savez(tmp_path / "in.npz", **{f"{n}_{k}": o[f"observation/{k}"] for n, o in observations.items()
                                     for k in ("image", "state")})
    plan = {"episode": ["a0", "a1", "a2", "a3"], "concurrent": [["b0", "b1"], ["c0", "c1"]],
            "extra": {n: {k: v for k, v in o.items() if not k.startswith("observation/")}
                      for n, o in observations.items()}}
    (tmp_path / "in.json").write_text(json.dumps(plan))
    with ServeProcess(served_run.dir, "--device", "cpu", cwd=tmp_path) as proc:
        done = _openpi("infer", proc.host, str(proc.port), str(tmp_path / "in"), str(tmp_path / "out"))
        code = proc.stop(signal.SIGINT)
    log = "\n".join(proc.lines)
    assert done.returncode == 0, f"{done.stderr}\nserver:\n{log}"
    assert code == 0 and proc.lines[-1] == "stopped (SIGINT) after 3 connection(s)", log
    report = json.loads((tmp_path / "out.json").read_text())
    got = dict(np.load(tmp_path / "out.npz"))

    meta = report["metadata"]
    assert meta["server"] == "fplus" and meta["experiment"] == "E2" and meta["action_horizon"] == 4
    assert report["timing"] == [["infer_ms", "queue_ms"]] + [["infer_ms", "prev_total_ms", "queue_ms"]] * 3
    # openpi's client turns the text frame into RuntimeError("Error in inference server:\n<our line>")
    assert report["error"] == ("Error in inference server:\nerror: `observation/image` must be a uint8 image of shape "
                               "(64, 64, 3), got an array of shape (64, 64, 3) and dtype float32")
    o = observations
    expected = dict(zip(["a0", "a1", "a2"], served_run.reference([o["a0"], o["a1"], o["a2"]]), strict=True))
    expected["a3"], expected["after_error"] = served_run.reference([o["a3"], o["after_error"]])
    expected["b0"], expected["b1"] = served_run.reference([o["b0"], o["b1"]])
    expected["c0"], expected["c1"] = served_run.reference([o["c0"], o["c1"]])
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        assert got[name].dtype == np.float32 and got[name].shape == (4, 2), name
        np.testing.assert_allclose(got[name], want, rtol=0, atol=ATOL, err_msg=name)
