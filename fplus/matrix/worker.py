"""One matrix run in a process of its own: the entry point the launchers start (`fplus.matrix.local` on this machine,
`fplus.matrix.slurm` inside a Slurm job).

    python -m fplus.matrix.worker OUTPUT_DIR/logs/E2.job.json [--resume-hint TEXT]
    python -m accelerate.commands.launch --config_file ddp.yaml --num_processes 2 -m fplus.matrix.worker JOB

The job file holds the run's name and its resolved settings (flat names, `fplus.settings.settings_to_flat`),
written by the launcher; the worker resolves them with nothing else (no profile, `.env` or environment: the
settings are exactly the launcher's) and runs `fplus.matrix.run_one`. Under several processes (RANK set) every
process trains and process 0 alone evaluates. Process 0 writes `<job>.result.json` ({"status", "did_work"}) when
the run succeeded. Exit status: 0; 1 and one `error: ...` line for an FplusError; 130/143 when SIGINT/SIGTERM
stopped training (a checkpoint was saved: the next matrix resumes it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fplus.errors import ConfigError, FplusError
from fplus.io import read_json, write_text_atomic
from fplus.settings import Settings, load_settings, settings_to_flat

JOB_SUFFIX = ".job.json"
PARENT_ENV = "FPLUS_MATRIX_PARENT"
"""The launcher's pid: a worker whose launcher dies gets SIGTERM (Linux), so it saves and stops instead of running
on unattended."""
RESULT_SUFFIX = ".result.json"
LOGS_DIR = "logs"


def logs_dir(settings: Settings) -> Path:
    """OUTPUT_DIR/logs: the run's log (<run>.log), job file and result file."""
    return Path(settings.train.output_dir) / LOGS_DIR


def job_file(settings: Settings, name: str) -> Path:
    return logs_dir(settings) / f"{name}{JOB_SUFFIX}"


def log_file(settings: Settings, name: str) -> Path:
    return logs_dir(settings) / f"{name}.log"


def result_file(job: Path) -> Path:
    return job.with_name(job.name.removesuffix(JOB_SUFFIX) + RESULT_SUFFIX)


def write_job(path: Path, name: str, settings: Settings, eval_device: str | None = None) -> Path:
    """Write the job file of one run (its name and flat settings; EVAL_DEVICE replaced by `eval_device` when given,
    see `fplus.matrix.devices.Slot.eval_device`) and remove a result left by an earlier invocation."""
    flat = settings_to_flat(settings)
    if eval_device is not None:
        flat["EVAL_DEVICE"] = eval_device
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"name": name, "settings": flat}, indent=1))
    result_file(path).unlink(missing_ok=True)
    return path


def read_job(path: Path) -> tuple[str, Settings]:
    """The run name and settings of a job file, resolved exactly (checked: they flatten back to the same values)."""
    job = read_json(path, "the matrix job file", "start the matrix again: it writes a new one")
    if not isinstance(job, dict) or not isinstance(job.get("settings"), dict) or not isinstance(job.get("name"), str):
        raise ConfigError(f"{path} is not a matrix job file (needs `name` and `settings`); start the matrix again")
    flat = job["settings"]
    settings = load_settings(None, {k: v for k, v in flat.items() if v is not None}, environ={}, dotenv=None)
    if settings_to_flat(settings) != flat:
        changed = sorted(k for k, v in settings_to_flat(settings).items() if flat.get(k) != v)
        raise ConfigError(f"{path}: the settings do not resolve to what the launcher wrote ({', '.join(changed)}); "
                          "start the matrix again with this fplus version")
    return job["name"], settings


def read_result(job: Path) -> dict | None:
    """The result a worker wrote ({"status", "did_work"}), or None when it wrote none."""
    path = result_file(job)
    return read_json(path, "the matrix run's result", "run the matrix again") if path.is_file() else None


def worker_command(job: Path, processes: int = 1, accelerate_config: Path | None = None, port: int | None = None,
                   resume_hint: str | None = None) -> list[str]:
    """The command that runs `job`: this Python on the worker module, or, for `processes` > 1, `accelerate launch`
    with `accelerate_config`, that many processes and the rendezvous `port` (free: runs on one machine must not
    share one)."""
    tail = ["-m", "fplus.matrix.worker", str(job)] + (["--resume-hint", resume_hint] if resume_hint else [])
    if processes == 1:
        return [sys.executable, *tail]
    if accelerate_config is None or port is None:
        raise ValueError("a multi-process worker needs an accelerate config and a port")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
            "--num_processes", str(processes), "--num_machines", "1", "--machine_rank", "0",
            "--main_process_port", str(port), *tail]


def _stop_with_parent() -> None:
    """SIGTERM when the launcher (FPLUS_MATRIX_PARENT, our parent) dies (Linux prctl; elsewhere nothing)."""
    expected = os.environ.get(PARENT_ENV)
    if not expected or not sys.platform.startswith("linux") or os.getppid() != int(expected):
        return  # not started by a launcher, or under accelerate launch (our parent is the launcher's process)
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    if os.getppid() != int(expected):  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    """Run the job of `argv` (see the module docstring); returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m fplus.matrix.worker", description=__doc__.splitlines()[0])
    parser.add_argument("job", type=Path, help="job file written by the matrix launcher")
    parser.add_argument("--resume-hint", default=None, help="how to resume, printed when a signal stops training")
    args = parser.parse_args(argv)
    from rich.console import Console

    from fplus.signals import signal_exit, sigterm_as_interrupt

    _stop_with_parent()
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    console = Console(width=int(os.environ.get("COLUMNS", "160")), soft_wrap=True, quiet=rank != 0)
    with sigterm_as_interrupt():
        try:
            name, settings = read_job(args.job)
            from fplus.matrix.pipeline import eval_stage, train_stage

            status, did_work = train_stage(name, settings, console, args.resume_hint)
            if rank != 0:
                return 0
            if world > 1:
                console.print(f"{name}: evaluating on process 0 (the other {world - 1} have finished)")
            did_work = eval_stage(name, settings, console) or did_work
        except FplusError as err:
            if rank == 0:
                print(f"error: {err}", file=sys.stderr, flush=True)
            return 1
        except KeyboardInterrupt as err:  # outside training (setup, evaluation): nothing to save
            signame, status_code = signal_exit(err)
            print(f"{signame}: stopped {args.job.name} outside training; the next matrix redoes what is missing",
                  file=sys.stderr, flush=True)
            return status_code
    write_text_atomic(result_file(args.job), json.dumps({"status": status, "did_work": did_work}))
    console.print(f"{name}: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
