"""What serving costs: round-trip latency through `fplus serve` (websockets + openpi's msgpack-numpy) against the same
inference in-process, on E0 and E2 runs of the tests' toy dataset (64x64 camera, 2-d state, H=4, tiny DINO) at two
backbone sizes: tiny (64 px) and mid (random Qwen3-VL, text hidden 512 x 4 layers, vision 256 x 4, 224 px, LoRA),
on the CPU, and the payload bytes per request.

    python benchmarks/serve.py [--iters 300] [--mid-iters 60] [--sizes tiny,mid]

Rows, per run (p50 / p99 over --iters observations of one episode, after a warm-up; torch on --threads threads,
default 1, here and in the server, so that both are timed alike and a shared machine disturbs them less):
    in-process        PolicyRunner.infer: online latent + prompt + predict (what the server runs per observation)
    policy.predict    the model alone (the reply's policy_timing.infer_ms)
    server, 1 client  `fplus serve` in a subprocess, a websockets client here: pack, send, decode + check, infer,
                      pack, receive, unpack (what a robot sees); each observation answered in-process and then
                      through the server (paired), overhead_p50_ms the median of the paired differences
    server, 2 clients two clients at once (each its own episode): inference is serialised, so a round trip waits
                      for the other client's inference too
and a protocol-only row at openpi's LIBERO size (2 cameras 224x224x3 + 8-d state): pack + unpack, bytes. The
actions through the server are compared with in-process ones (max abs difference). Writes
benchmarks/results/serve-<device>.json.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import environment, markdown_table, write_results  # noqa: E402

SIZES = {"tiny": {}, "mid": {"BACKBONE": "random-qwen3-vl-mid", "IMAGE_SIZE": 224, "FINETUNE": "lora"}}


def train_toy_runs(root: Path, size: str) -> dict[str, Path]:
    """E0 and E2 runs on the tests' toy dataset (2 optimiser steps each): the tiny backbone at 64 px, or (mid) the
    random mid-size Qwen3-VL (text 512 x 4 layers, vision 256 x 4) at 224 px with LoRA."""
    from accelerate.state import AcceleratorState, PartialState

    from fplus.rundir import run_dir_for
    from fplus.train.run import train_run
    from tests.helpers import compute_toy_latents, toy_settings, write_toy_dataset

    if not (root / "ds").exists():
        write_toy_dataset(root / "ds", lengths=(8, 7, 9, 6))
    runs = {}
    for exp in ("E0", "E2"):
        s = toy_settings(root / size, root / "ds", EXPERIMENT=exp, MAX_STEPS=2, VAL_FRACTION=0.25, **SIZES[size])
        if exp == "E2":
            compute_toy_latents(s)
        train_run(s, run_dir_for(s), progress_bar=False)
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
        runs[f"{exp} {size}"] = run_dir_for(s)
    return runs


def observation(t: int) -> dict:
    frame = np.full((64, 64, 3), 30, np.uint8)
    x = 4 + 2 * (t % 20)
    frame[10:18, x:x + 8] = (230, 200, 40)
    return {"observation/image": frame, "observation/state": np.array([x, 10.0]), "prompt": "move the square right"}


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


class Server:
    """`fplus serve RUN --port 0 --device cpu` in a subprocess; the bound address from its `serving` line."""

    def __init__(self, run_dir: Path, cwd: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "fplus.cli.main", "serve", str(run_dir), "--port", "0",
                                      "--device", "cpu"], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "400"})
        for line in self.proc.stdout:
            found = re.search(r" on ws://([^:\s]+):(\d+):", line)
            if found:
                self.url = f"ws://{found.group(1)}:{found.group(2)}"
                break
        else:
            raise RuntimeError(f"fplus serve exited with {self.proc.wait()}")
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()  # drain the log

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def round_trips(url: str, iters: int, warmup: int, barrier: threading.Barrier | None = None,
                out: list | None = None) -> list[float]:
    """One client's episode of round trips (seconds each, after the warm-up); appended to `out` too."""
    from websockets.sync.client import connect

    from fplus.deploy.protocol import packb, unpackb

    times = []
    with connect(url, compression=None, max_size=None, open_timeout=60) as ws:
        ws.recv()  # metadata
        for t in range(warmup + iters):
            message = packb(observation(t))
            if barrier is not None:
                barrier.wait()
            start = time.perf_counter()
            ws.send(message)
            unpackb(ws.recv())
            if t >= warmup:
                times.append(time.perf_counter() - start)
    if out is not None:
        out.append(times)
    return times


def bench_run(exp: str, run_dir: Path, iters: int, warmup: int, cwd: Path) -> tuple[list[dict], float]:
    """Paired samples: each observation is answered in-process and through the server one after the other, so both
    see the same machine load; then two clients at once."""
    from websockets.sync.client import connect

    from fplus.deploy.observation import parse_observation
    from fplus.deploy.protocol import packb, unpackb
    from fplus.deploy.runner import load_runner
    from fplus.settings import load_settings

    runner = load_runner(run_dir, None, "cpu", load_settings(None, {}, environ={}, dotenv=None).serve)
    episode = runner.new_episode()
    local, predict, served, diff = [], [], [], 0.0
    server = Server(run_dir, cwd)
    try:
        with connect(server.url, compression=None, max_size=None, open_timeout=60) as ws:
            ws.recv()  # metadata
            for t in range(warmup + iters):
                raw = observation(t)
                start = time.perf_counter()
                reply = runner.infer(episode, parse_observation(raw, runner.spec, runner.supports_prefix))
                local_s = time.perf_counter() - start
                message = packb(raw)
                start = time.perf_counter()
                ws.send(message)
                answer = ws.recv()
                remote = unpackb(answer)
                served_s = time.perf_counter() - start
                diff = max(diff, float(np.abs(remote["actions"] - reply["actions"]).max()))
                if t >= warmup:
                    local.append(local_s)
                    served.append(served_s)
                    predict.append(reply["policy_timing"]["infer_ms"] / 1e3)
        barrier, results = threading.Barrier(2), []
        clients = [threading.Thread(target=round_trips, args=(server.url, iters, warmup, barrier, results))
                   for _ in range(2)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
    finally:
        server.close()
    base = {"run": exp, "request_bytes": len(message), "reply_bytes": len(answer)}
    rows = [{**base, "path": "in-process (runner.infer)", **percentiles(local)},
            {**base, "path": "policy.predict only", **percentiles(predict)},
            {**base, "path": "server, 1 client", **percentiles(served),
             "overhead_p50_ms": float(np.percentile(np.subtract(served, local), 50) * 1e3)},
            {**base, "path": "server, 2 clients at once", **percentiles(results[0] + results[1])}]
    return rows, diff


def protocol_libero(iters: int) -> dict:
    """pack + unpack of an openpi LIBERO-sized observation (two 224x224x3 cameras, 8-d state, prompt)."""
    from fplus.deploy.protocol import packb, unpackb

    rng = np.random.default_rng(0)
    obs = {"observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
           "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
           "observation/state": rng.normal(size=8), "prompt": "put the bowl on the plate"}
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        unpackb(packb(obs))
        times.append(time.perf_counter() - start)
    return {"run": "-", "path": "protocol only: pack + unpack, LIBERO-size obs", "request_bytes": len(packb(obs)),
            "reply_bytes": "", **percentiles(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=300, help="observations per run at the tiny size")
    parser.add_argument("--mid-iters", type=int, default=60, help="observations per run at the mid size")
    parser.add_argument("--sizes", default="tiny,mid", help="comma-separated: tiny (64 px, tiny backbone), mid "
                        "(224 px, random Qwen3-VL text 512 x 4, vision 256 x 4, LoRA)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and in the server (default 1: "
                        "stable numbers on a shared machine)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))  # the server's
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows, diffs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            if size not in SIZES:
                parser.error(f"--sizes: unknown size {size!r}; choose from {', '.join(SIZES)}")
            iters = args.iters if size == "tiny" else args.mid_iters
            for exp, run_dir in train_toy_runs(Path(tmp), size).items():
                exp_rows, diffs[exp] = bench_run(exp, run_dir, iters, args.warmup, Path(tmp))
                rows += exp_rows
    rows.append(protocol_libero(args.iters))
    print(markdown_table(rows, ["run", "path", "p50_ms", "p99_ms", "overhead_p50_ms", "request_bytes",
                                "reply_bytes"]))
    print(f"max |server - in-process| over the episode's actions: {diffs}  ({environment()['device']})")
    path = write_results("serve", rows, {"iters": args.iters, "mid_iters": args.mid_iters, "threads": args.threads,
                                         "max_abs_diff_server_vs_in_process": diffs})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
