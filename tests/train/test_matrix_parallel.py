"""The matrix on several devices of one machine (MATRIX_DEVICES): slots, worker processes, failures, Ctrl-C.

The process tests run two toy runs at once on MATRIX_DEVICES=cpu,cpu (each a `python -m fplus.matrix.worker`
process) and compare them with the in-process sequential matrix."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from fplus.errors import ConfigError, FplusError
from fplus.matrix import run_matrix
from fplus.matrix.devices import Slot, accelerate_config, resolve_slots
from fplus.matrix.local import stopped_message
from fplus.matrix.table import Row
from fplus.matrix.worker import read_job, worker_command, write_job
from fplus.rundir import COMPLETE
from fplus.settings import load_settings, settings_to_flat
from tests.helpers import toy_settings, write_toy_dataset

REPO = Path(__file__).resolve().parents[2]
RUNS = ("E0-seed0", "E0-seed1")


def toy_profile(root: Path, **extra) -> str:
    write_toy_dataset(root / "ds", lengths=(8, 7, 9, 6, 8))
    flat = settings_to_flat(toy_settings(root, root / "ds", MATRIX_EXPERIMENTS="E0", MATRIX_SEEDS="0,1", **extra))
    path = root / "toy.env"
    path.write_text("".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}\n"
                            for k, v in flat.items() if v is not None))
    return str(path)


def results(run: Path) -> dict:
    """What must not depend on where a run ran: checkpoint files (bytes), metrics without the throughput, and the
    evaluation files without the run's path. Of the random states a checkpoint saves (rng-0.pt) the torch ones:
    numpy's and Python's global states are saved for resume but never seeded by fplus (nothing in training draws
    from them), so they differ between any two processes, and with them rng-0.pt's hash in checkpoint.json."""
    out = {}
    for p in sorted((run / "checkpoints").rglob("*")):
        if p.name == "rng-0.pt":
            state = torch.load(p, weights_only=False)
            out[str(p.relative_to(run))] = [state["torch"].tolist(), state["generator"].tolist()]
        elif p.name == "checkpoint.json":
            manifest = json.loads(p.read_text())
            manifest["files"].pop("rng-0.pt")
            out[str(p.relative_to(run))] = manifest
        elif p.is_file():
            out[str(p.relative_to(run))] = p.read_bytes()
    out["metrics"] = [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"}
                      for line in (run / "metrics.jsonl").read_text().splitlines()]
    for path in sorted((run / "eval").glob("*.json")):
        out[path.name] = {k: v for k, v in json.loads(path.read_text()).items() if k != "run"}
    return out


# ----- slots, job files, commands (no process) ------------------------------------------------------------------


def test_devices_become_slots_and_pin_each_worker():
    assert resolve_slots(["auto"], gpus=0) == ([Slot()], True)  # today's in-process matrix
    assert resolve_slots(["auto"], gpus=1) == ([Slot((0,))], True)
    assert resolve_slots(["auto"], gpus=3) == ([Slot((0,)), Slot((1,)), Slot((2,))], False)
    slots, in_process = resolve_slots(["cuda:0+cuda:1", "cuda:2+cuda:3"], gpus=4)
    assert [s.label for s in slots] == ["cuda:0+cuda:1", "cuda:2+cuda:3"] and not in_process
    assert [s.processes for s in slots] == [2, 2]
    assert resolve_slots(["cpu", "cpu"], gpus=0) == ([Slot(), Slot()], False)
    assert resolve_slots(["cpu"], gpus=2) == ([Slot()], False)  # pinned in a worker that sees no GPU
    assert resolve_slots(["cuda:1"], gpus=2) == ([Slot((1,))], False)
    with pytest.raises(ConfigError, match=r"MATRIX_DEVICES names cuda:2 but this machine shows 2 CUDA GPU\(s\)"):
        resolve_slots(["cuda:0", "cuda:2"], gpus=2)
    assert Slot().environ({}) == {"CUDA_VISIBLE_DEVICES": ""}
    assert Slot((1, 2)).environ({}) == {"CUDA_VISIBLE_DEVICES": "1,2"}
    assert Slot((1, 2)).environ({"CUDA_VISIBLE_DEVICES": "4,5,6"}) == {"CUDA_VISIBLE_DEVICES": "5,6"}
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES=4 shows 1 GPU"):
        Slot((1,)).environ({"CUDA_VISIBLE_DEVICES": "4"})
    assert [Slot((3,)).eval_device(d) for d in ("auto", "cuda", "cuda:3", "cpu")] == ["auto", "cuda", "cuda", "cpu"]
    assert [Slot().eval_device(d) for d in ("auto", "cuda:1", "cpu")] == ["auto", "cpu", "cpu"]


def test_cpu_slots_share_the_cores_and_the_parent_can_say_otherwise():
    from fplus.matrix.local import cpu_threads, worker_environ

    assert cpu_threads([Slot(), Slot()], cpus=2) == 1 and cpu_threads([Slot(), Slot()], cpus=8) == 4
    assert cpu_threads([Slot()], cpus=2) == 2 and cpu_threads([Slot()] * 3, cpus=2) == 1
    assert cpu_threads([Slot((0,)), Slot()], cpus=8) == 8  # GPU slots take no share of the cores
    assert worker_environ(Slot(), {}, threads=1)["OMP_NUM_THREADS"] == "1"
    assert worker_environ(Slot(), {"OMP_NUM_THREADS": "3"}, threads=1)["OMP_NUM_THREADS"] == "3"
    assert "OMP_NUM_THREADS" not in worker_environ(Slot((0,)), {}, threads=1)
    assert "OMP_NUM_THREADS" not in worker_environ(Slot(), {})


@pytest.mark.parametrize("value, message", [
    ("cuda:0,cuda:0", "names cuda:0 twice"),
    ("cpu+cuda:1", "cpu stands alone"),
    ("gpu0", "'gpu0' is not cpu or cuda:N"),
    ("auto,cpu", "auto stands alone"),
])
def test_bad_matrix_devices_are_one_line_errors(value, message):
    with pytest.raises(ConfigError, match=rf"MATRIX_DEVICES='{re.escape(value)}' \(from command line\): .*{message}"):
        load_settings(None, {"MATRIX_DEVICES": value}, environ={}, dotenv=None)


def test_job_file_round_trips_the_settings_and_a_group_runs_under_accelerate(tmp_path):
    settings = toy_settings(tmp_path, tmp_path / "ds", EXPERIMENT="E2", SEED=3, RUN_NAME="E2-seed3")
    job = write_job(tmp_path / "E2.job.json", "E2-seed3", settings, eval_device="cpu")
    name, loaded = read_job(job)
    assert name == "E2-seed3"
    assert settings_to_flat(loaded) == {**settings_to_flat(settings), "EVAL_DEVICE": "cpu"}
    config = accelerate_config("ddp")
    assert config == REPO / "profiles" / "accelerate" / "ddp.yaml"
    command = worker_command(job, 2, config, 29611, "run it again")
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    i = command.index("--num_processes")
    assert command[i + 1] == "2" and command[command.index("--main_process_port") + 1] == "29611"
    assert command[command.index("--config_file") + 1] == str(config)
    assert command[-5:] == ["-m", "fplus.matrix.worker", str(job), "--resume-hint", "run it again"]
    assert worker_command(job, 1) == [sys.executable, "-m", "fplus.matrix.worker", str(job)]
    with pytest.raises(ConfigError, match=r"MATRIX_ACCELERATE_CONFIG=zero9: .* valid names: ddp, deepspeed, fsdp"):
        accelerate_config("zero9")


def test_no_wait_needs_slurm(tmp_path):
    profile = toy_profile(tmp_path, MAX_STEPS=3)
    with pytest.raises(ConfigError, match="--no-wait needs MATRIX_LAUNCHER=slurm"):
        run_matrix(profile, console=Console(record=True), wait=False)


# ----- worker processes -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_runs_at_once_equal_the_sequential_matrix_bit_for_bit(tmp_path, monkeypatch):
    """At the same torch thread count (the last bits of CPU kernels depend on it): one here, in-process, and one
    in each worker (the parent's OMP_NUM_THREADS wins over the cpu slots' share of the cores)."""
    seq, par = tmp_path / "seq", tmp_path / "par"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = run_matrix(toy_profile(seq, MAX_STEPS=3), console=Console(record=True))  # cpu: in-process
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert first.runs == {r: "trained" for r in RUNS}
    console = Console(record=True, width=200)
    profile = toy_profile(par, MAX_STEPS=3)
    outcome = run_matrix(profile, overrides={"MATRIX_DEVICES": "cpu,cpu"}, console=console)
    assert outcome.runs == {r: "trained" for r in RUNS} and outcome.did_work
    for run in RUNS:
        assert results(par / "runs" / run) == results(seq / "runs" / run)
    # the two workers ran at the same time: both were launched before either finished (launch times from the log
    # headers: on a loaded machine one worker's imports can outlast the other's 3 steps, so not training starts)
    import re

    launched = [float(re.search(r"\(launched at ([0-9.]+)\)", (par / "runs" / "logs" / f"{r}.log").read_text())[1])
                for r in RUNS]
    ends = [(par / "runs" / r / "COMPLETE").stat().st_mtime for r in RUNS]
    assert max(launched) < min(ends)
    text = console.export_text()
    assert "matrix: 2 runs on cpu, cpu" in text
    for run in RUNS:
        log = (par / "runs" / "logs" / f"{run}.log").read_text()
        assert f"fplus matrix: {run} on cpu" in log and f"{run}: trained" in log
        assert str(par / "runs" / "logs" / f"{run}.log") in text
    assert (par / "runs" / "report" / "report.json").is_file()
    again = run_matrix(profile, overrides={"MATRIX_DEVICES": "cpu,cpu"}, console=Console(record=True))
    assert again.runs == {r: "complete" for r in RUNS} and not again.did_work


@pytest.mark.slow
def test_a_failing_run_is_reported_and_the_other_finishes(tmp_path):
    profile = toy_profile(tmp_path, MAX_STEPS=3)
    broken = tmp_path / "runs" / "E0-seed1"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{not json")  # a damaged partial run: its resume fails
    console = Console(record=True, width=200)
    with pytest.raises(FplusError, match=r"1 of 2 matrix runs failed: E0-seed1: exit status 1, log "
                       + str(tmp_path / "runs" / "logs" / "E0-seed1.log")):
        run_matrix(profile, overrides={"MATRIX_DEVICES": "cpu,cpu"}, console=console)
    text = console.export_text()
    assert "E0-seed1 failed (exit status 1); the end of" in text
    assert "error: " in text and "config.json" in text  # the worker's one-line error, from the log tail
    assert (tmp_path / "runs" / "E0-seed0" / "COMPLETE").is_file()
    assert (tmp_path / "runs" / "E0-seed0" / "eval" / "offline-step-000003.json").is_file()
    report = json.loads((tmp_path / "runs" / "report" / "report.json").read_text())
    assert "E0-seed0" in json.dumps(report) and "E0-seed1" not in json.dumps(report)


def test_the_stop_message_tells_a_run_stopped_in_training_from_one_stopped_in_its_evaluation(tmp_path):
    rows = [Row(name, tmp_path / name, tmp_path / f"{name}.log") for name in ("E0-seed0", "E2-seed0", "E4-seed0")]
    for row in rows:
        row.run_dir.mkdir()
    (rows[1].run_dir / COMPLETE).write_text('{"step": 5}')
    assert stopped_message("SIGINT", rows, ["E1-seed0"], "run it again") == (
        "SIGINT: matrix stopped; stopped E0-seed0, E4-seed0 (each saved a checkpoint of its last step); stopped "
        "E2-seed0 while evaluating (training had finished; the evaluation runs again); never started E1-seed0; "
        "run it again")
    assert stopped_message("SIGTERM", [], [], "hint") == "SIGTERM: matrix stopped; nothing was running; hint"


@pytest.mark.slow
def test_sigint_stops_every_worker_and_a_second_matrix_resumes(tmp_path):
    STEPS = 400
    # enough steps that neither run can finish while the other is still starting (toy steps take ~25 ms: at 24 steps
    # a CI machine once saw one run complete before the other had logged two)
    profile = toy_profile(tmp_path, MAX_STEPS=STEPS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "FPLUS_DEBUG": ""}
    # SIGINT at its default in the child, even when the tests run from a background shell (which ignores it)
    parent = subprocess.Popen([sys.executable, "-m", "fplus.cli.main", "matrix", "--profile", profile,
                               "--devices", "cpu,cpu"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics = [tmp_path / "runs" / r / "metrics.jsonl" for r in RUNS]
    deadline = time.time() + 240
    while not all(p.is_file() and len(p.read_text().splitlines()) >= 2 for p in metrics):
        assert parent.poll() is None and time.time() < deadline, parent.communicate()[0]
        time.sleep(0.5)
    parent.send_signal(signal.SIGINT)
    out, _ = parent.communicate(timeout=180)
    assert parent.returncode == 130, out
    assert "SIGINT: stopping 2 run(s)" in out
    assert ("SIGINT: matrix stopped; stopped E0-seed0, E0-seed1 (each saved a checkpoint of its last step)" in out
            and "again to resume" in out)
    stopped_at = {}
    for run in RUNS:
        run_dir = tmp_path / "runs" / run
        assert not (run_dir / "COMPLETE").exists()
        saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        stopped_at[run] = int(saved[-1].removeprefix("step-"))
        assert 2 <= stopped_at[run] < STEPS
        assert "checkpoint saved" in (tmp_path / "runs" / "logs" / f"{run}.log").read_text()
    again = run_matrix(profile, overrides={"MATRIX_DEVICES": "cpu,cpu"}, console=Console(record=True))
    assert again.runs == {r: "resumed" for r in RUNS}
    for run in RUNS:
        steps = [json.loads(line)["step"] for line in metrics[RUNS.index(run)].read_text().splitlines()
                 if json.loads(line)["kind"] == "train"]
        assert steps == list(range(1, STEPS + 1))  # resumed after the saved step, nothing lost or repeated
        assert "resumed" in (tmp_path / "runs" / "logs" / f"{run}.log").read_text()


@pytest.mark.slow
def test_worker_under_two_processes_trains_with_ddp_and_evaluates_once(tmp_path):
    """What a GPU group runs under `accelerate launch --num_processes 2`, here under torchrun on CPU (gloo): every
    process trains, process 0 alone evaluates and writes the result."""
    write_toy_dataset(tmp_path / "ds", lengths=(8, 7, 9, 6, 8))
    settings = toy_settings(tmp_path, tmp_path / "ds", EXPERIMENT="E0", MAX_STEPS=3, BATCH_SIZE=2)
    job = write_job(tmp_path / "runs" / "logs" / "E0.job.json", "E0", settings)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                           "fplus.matrix.worker", str(job)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("E0: train -> ") == 1  # process 1 prints nothing
    assert done.stdout.count("E0: evaluating on process 0 (the other 1 have finished)") == 1
    assert json.loads((tmp_path / "runs" / "logs" / "E0.result.json").read_text()) == {"status": "trained",
                                                                                       "did_work": True}
    assert sorted(p.name for p in (tmp_path / "runs" / "E0" / "eval").iterdir()) == ["offline-step-000003.json"]
    saved = tmp_path / "runs" / "E0" / "checkpoints" / "step-000003"
    assert sorted(p.name for p in saved.glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]  # both processes trained
