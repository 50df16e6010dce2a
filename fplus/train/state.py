"""What a training run's resumable state is besides the weights: progress, schedules, random states, the metrics
file on resume, and the exceptions a signal raises."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fplus.io import write_text_atomic


class TrainingInterrupted(SystemExit):
    """SIGINT/SIGTERM stopped training after a step and its checkpoint: exit status 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(128 + signum)
        self.signum, self.message = signum, message


class TrainingAborted(TrainingInterrupted):
    """A second signal (or one during setup) stopped training at once: the step in progress is lost."""


@dataclass
class TrainProgress:
    """Where training stands: optimiser steps done, current epoch, micro-batches of this epoch consumed."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    skipped_nonfinite: int = 0  # steps whose batch was skipped for a non-finite loss or gradient (NONFINITE=skip)


def p_oracle_at(step: int, total: int, start: float, end: float) -> float:
    """Scheduled sampling: linear from `start` at step 0 to `end` at the last step."""
    return start + (end - start) * min(1.0, step / max(1, total - 1))


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warm-up to 1, then cosine decay to `min_ratio` at `total` steps."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def truncate_metrics(path: Path, step: int) -> int:
    """Drop metric lines written after `step` (they will be written again by the resumed run; step -1: all of
    them), and lines that are not JSON (a write cut off by a kill). Returns how many lines were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step
        except json.JSONDecodeError:
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_text_atomic(path, "".join(line + "\n" for line in kept))
    return dropped
