"""The matrix on Slurm (MATRIX_LAUNCHER=slurm) through submitit: the sbatch parameters of a run's job, the requeue
hook, and, against a real Slurm (`bash scripts/local_slurm.sh`: slurmctld + slurmd on this machine; .ci/run runs
it and sets FPLUS_SLURM=1), toy runs submitted, one of them interrupted by SIGUSR2 (Slurm's time-limit signal)
and requeued, the results and `fplus matrix --status` checked."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from fplus.errors import ConfigError
from fplus.settings import settings_to_flat
from tests.helpers import run_cli, toy_settings, write_toy_dataset

submitit = pytest.importorskip("submitit", reason='submitit is not installed: pip install -e ".[slurm]"')

from fplus.matrix import run_matrix  # noqa: E402
from fplus.matrix.slurm import MatrixJob, job_state, read_jobs, slurm_parameters, slurm_reachable  # noqa: E402

RUNS = ("E0-seed0", "E0-seed1")


def toy_profile(root: Path, **extra) -> str:
    write_toy_dataset(root / "ds", lengths=(8, 7, 9, 6, 8))
    flat = settings_to_flat(toy_settings(root, root / "ds", MATRIX_EXPERIMENTS="E0", MATRIX_SEEDS="0,1",
                                         MATRIX_LAUNCHER="slurm", SLURM_GPUS_PER_JOB=0, SLURM_TIME_MIN=20, **extra))
    path = root / "toy.env"
    path.write_text("".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}\n"
                            for k, v in flat.items() if v is not None))
    return str(path)


def test_sbatch_script_of_a_matrix_job_carries_the_slurm_settings(tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string  # what SlurmExecutor writes as the job's sbatch file

    settings = toy_settings(tmp_path, tmp_path / "ds", SLURM_PARTITION="gpu", SLURM_GPUS_PER_JOB=2,
                            SLURM_TIME_MIN=240, SLURM_ACCOUNT="vla-lab", SLURM_CPUS_PER_JOB=16, SLURM_MEM_GB=64)
    script = _make_sbatch_string(command="python -m x", folder=tmp_path / "%j",
                                 **slurm_parameters(settings.run, "E2-seed1"))
    lines = set(script.splitlines())
    for flag in ("--job-name=fplus-E2-seed1", "--partition=gpu", "--gpus-per-node=2", "--time=240",
                 "--account=vla-lab", "--cpus-per-task=16", "--mem=64GB", "--nodes=1", "--ntasks-per-node=1",
                 "--signal=USR2@90"):
        assert f"#SBATCH {flag}" in lines, flag
    cpu = toy_settings(tmp_path, tmp_path / "ds", SLURM_GPUS_PER_JOB=0, SLURM_MEM_GB=1.5)
    params = slurm_parameters(cpu.run, "E0")
    assert "gpus_per_node" not in params and params["mem"] == "1536MB"
    assert {"partition", "account", "cpus_per_task"}.isdisjoint(params)  # unset: the cluster's defaults


def test_checkpoint_stops_the_worker_once_and_hands_back_the_same_job(tmp_path):
    """submitit calls `checkpoint` on SIGUSR2: the worker gets SIGTERM (it saves and exits), unless Slurm's SIGTERM
    reached it already, and the returned submission is a fresh copy of the job that pickles without the process."""
    child = ("import signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
             "print('up', flush=True)\n"
             "time.sleep(float(sys.argv[1]))\n")
    job = MatrixJob("E2-seed1", tmp_path / "E2-seed1.job.json", tmp_path, 0, None, "run it again")
    job._process = subprocess.Popen([sys.executable, "-c", child, "60"], stdout=subprocess.PIPE)
    job._process.stdout.readline()
    started = time.monotonic()
    delayed = job.checkpoint()
    assert job._process.returncode == 143 and time.monotonic() - started < 10
    again = delayed.function
    assert isinstance(again, MatrixJob) and again is not job and again._process is None
    assert (again.name, again.job, again.cwd, again.gpus, again.hint) == (job.name, job.job, job.cwd, 0,
                                                                          "run it again")
    assert pickle.loads(pickle.dumps(again)).name == "E2-seed1"
    # Slurm's SIGTERM already reached the whole job (preemption): checkpoint only waits for the worker
    job._process = subprocess.Popen([sys.executable, "-c", child, "1"], stdout=subprocess.PIPE)
    job._process.stdout.readline()
    job._term_seen = True
    job.checkpoint()
    assert job._process.returncode == 0  # ended by itself: no second signal


slurm = pytest.mark.skipif(not os.environ.get("FPLUS_SLURM") and not slurm_reachable(),
                           reason="no reachable Slurm (sbatch/squeue): run `bash scripts/local_slurm.sh` (root, apt) "
                                  "and set FPLUS_SLURM=1, as .ci/run does")


@pytest.mark.slow
@slurm
def test_slurm_matrix_requeues_a_timed_out_run_and_writes_the_report(tmp_path, monkeypatch):
    assert slurm_reachable(), "FPLUS_SLURM=1 but sbatch/squeue do not answer: run scripts/local_slurm.sh"
    monkeypatch.chdir(tmp_path)
    profile = toy_profile(tmp_path, MAX_STEPS=30)
    submitted = run_matrix(profile, console=Console(record=True), wait=False)
    assert submitted.runs == {r: "submitted" for r in RUNS} and submitted.report is None
    jobs = {name: record["job_id"] for name, record in read_jobs(submitted_settings(tmp_path)).items()}
    assert sorted(jobs) == list(RUNS)
    script = (tmp_path / "runs" / "slurm" / "submitit" / jobs["E0-seed0"] / f"{jobs['E0-seed0']}_submission.sh")
    assert "#SBATCH --signal=USR2@90" in script.read_text() and "#SBATCH --time=20" in script.read_text()
    with pytest.raises(ConfigError, match=rf"E0-seed0 \(Slurm job {jobs['E0-seed0']}\), E0-seed1 \(Slurm job "
                       rf"{jobs['E0-seed1']}\) still in Slurm"):
        run_matrix(profile, overrides={"MATRIX_LAUNCHER": "local"}, console=Console(record=True))
    metrics = tmp_path / "runs" / "E0-seed0" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert time.time() < deadline, f"job {jobs['E0-seed0']} did not train: {job_state(jobs['E0-seed0'])}"
        time.sleep(1)
    # the time-limit signal: the worker saves a checkpoint and submitit requeues the job
    subprocess.run(["scancel", "--signal=USR2", jobs["E0-seed0"]], check=True)
    console = Console(record=True, width=200)
    outcome = run_matrix(profile, console=console)  # waits for the jobs in the queue; submits nothing new
    assert outcome.runs == {"E0-seed0": "resumed", "E0-seed1": "trained"}
    assert {n: r["job_id"] for n, r in read_jobs(submitted_settings(tmp_path)).items()} == jobs
    assert "already in Slurm job" in console.export_text()
    log = (tmp_path / "runs" / "logs" / "E0-seed0.log").read_text()
    assert "SIGTERM: stopped" in log and "checkpoint saved" in log and "resume ->" in log
    assert log.count(f"in Slurm job {jobs['E0-seed0']}") == 2  # the same job, run twice
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 31))
    for run in RUNS:
        assert (tmp_path / "runs" / run / "eval" / "offline-step-000030.json").is_file()
    assert (tmp_path / "runs" / "report" / "report.json").is_file()
    assert not (tmp_path / "runs" / "slurm" / "REPORT_PENDING").exists()
    status = run_cli("matrix", "--profile", profile, "--status")
    assert status.exit_code == 0, status.stdout + status.stderr
    for run in RUNS:
        row = next(line for line in status.stdout.splitlines() if run in line)
        assert "complete" in row and "30/30" in row and "offline" in row and jobs[run] in row
        assert "COMPLETED" in row


def submitted_settings(root: Path):
    return toy_settings(root, root / "ds")  # OUTPUT_DIR is root/runs, where the job records live


def test_sigusr2_is_what_submitit_sends_before_the_time_limit():
    """The signal the worker must be shielded from and `checkpoint` must turn into SIGTERM (see fplus.matrix.slurm)."""
    from submitit.slurm.slurm import SlurmJobEnvironment

    assert SlurmJobEnvironment._usr_sig() == signal.SIGUSR2
