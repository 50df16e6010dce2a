"""Helpers of the serving tests: toy observations in openpi's LIBERO layout, and the in-process reference of what a
run's policy predicts for an episode of observations, computed the closed loop's way (not through fplus.deploy)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

PROMPTS = ("move the square right", "move the square down")


def toy_frame(x: int, y: int, size: int = 64) -> np.ndarray:
    """A frame of the toy dataset's kind: a bright 8-pixel square at (x, y) on a dark background."""
    frame = np.full((size, size, 3), 30, np.uint8)
    frame[y:y + 8, x:x + 8] = (230, 200, 40)
    return frame


def toy_observation(t: int, prompt: str = PROMPTS[0], **extra) -> dict:
    """Observation t of an episode in openpi's LIBERO layout (the server's default keys): the square moves right."""
    x, y = 4 + 2 * (t % 20), 10 + (t // 20) % 30
    return {"observation/image": toy_frame(x, y), "observation/state": np.array([x, y], np.float64),
            "prompt": prompt, **extra}


@dataclass
class ServedRun:
    dir: Path
    policy: object
    encoder: object

    def reference(self, episode: list[dict]) -> list[np.ndarray]:
        """The actions (H, A) the policy predicts for each observation of one episode, in this process: every main
        camera frame enters fplus.deploy.episode.OnlineLatents, the batch is observation_batch + the processor,
        z_hist the latents' window, then policy.predict (as the closed loop's rollout does)."""
        from fplus import batch as K
        from fplus.deploy.episode import OnlineLatents, observation_batch

        latents = OnlineLatents(self.encoder, self.policy.config.history)
        out = []
        for obs in episode:
            latents.add(obs["observation/image"])
            if obs.get("observe_only"):
                continue
            raw = {"image": obs["observation/image"], "state": obs["observation/state"].astype(np.float32)}
            batch = self.policy.processor(observation_batch(raw, ("image",), obs["prompt"], True))
            batch[K.Z_HIST] = latents.history_window()
            extra = {}
            if "action_prefix" in obs:
                extra = {"prefix": torch.from_numpy(obs["action_prefix"].astype(np.float32))[None],
                         "inference_delay": obs["inference_delay"]}
            out.append(self.policy.predict(batch, **extra).actions[0].numpy())  # MSE head: no noise
        return out


class ServeProcess:
    """`fplus serve RUN --port 0 ARGS` in a subprocess (python -m fplus.cli.main), with its stdout read by a thread:

        with ServeProcess(run_dir) as proc:     # waits for the `serving ... on ws://HOST:PORT` line
            proc.host, proc.port, proc.lines
    On exit the process is stopped with SIGTERM if still running (`stop` sends a signal and waits)."""

    def __init__(self, run_dir: Path, *args: str, cwd: Path | None = None, timeout: float = 180.0):
        self.command = [sys.executable, "-m", "fplus.cli.main", "serve", str(run_dir), "--port", "0", *args]
        self.cwd, self.timeout = cwd, timeout
        self.lines: list[str] = []
        self.host: str | None = None
        self.port: int | None = None

    def __enter__(self) -> ServeProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "400"}
        self.proc = subprocess.Popen(self.command, cwd=self.cwd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                found = re.search(r" on ws://([^:\s]+):(\d+):", line)
                if found:
                    self.host, self.port = found.group(1), int(found.group(2))
                    ready.set()
            ready.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        ready.wait(self.timeout)
        if self.port is None:
            self.proc.kill()
            raise AssertionError("fplus serve did not start:\n" + "\n".join(self.lines))
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.stop()
