"""The training loop with 2 CPU processes (gloo DDP), launched by torchrun: the launcher `accelerate launch` runs
for multi-GPU configs (its own multi-CPU mode needs MPI)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fplus.settings import settings_to_flat
from fplus.train import checkpoint as ckpt
from tests.helpers import compute_toy_latents, toy_settings, write_toy_dataset


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    write_toy_dataset(tmp_path / "ds")
    s = toy_settings(tmp_path, tmp_path / "ds", EXPERIMENT="E2", MAX_STEPS=4, BATCH_SIZE=2, SAVE_EVERY=2)
    compute_toy_latents(s)
    env = {k: v for k, v in os.environ.items() if k not in ("FPLUS_PROFILE",)}
    env.update({k: str(v) for k, v in settings_to_flat(s).items() if v is not None})
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    out = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "fplus.cli.main", "train"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "runs" / "E2"
    assert (run_dir / "COMPLETE").is_file()
    last = ckpt.latest_valid(run_dir)
    assert last.name == "step-000004"
    assert (last / "rng-0.pt").is_file() and (last / "rng-1.pt").is_file(), "both processes saved their state"
    r0, r1 = torch.load(last / "rng-0.pt", weights_only=False), torch.load(last / "rng-1.pt", weights_only=False)
    assert not torch.equal(r0["generator"], r1["generator"]), "each process draws its own scheduled sampling"
