"""The matrix on Slurm: each run that has work left is one job, submitted through submitit (the `slurm` extra).

    fplus matrix --profile h100 --launcher slurm            # submit, show the jobs live, write the report at the end
    fplus matrix --profile h100 --launcher slurm --no-wait  # submit and return; `fplus matrix --status` shows them

A job runs `fplus.matrix.worker` for its run in a child process (SLURM_GPUS_PER_JOB > 1: under `accelerate launch`
on the job's node), its output appended to OUTPUT_DIR/logs/<run>.log. Job ids are recorded in
OUTPUT_DIR/slurm/jobs.json (submitit's files in OUTPUT_DIR/slurm/submitit/), so a later matrix waits for a job
that is still pending or running instead of submitting the run again.

Time limit and preemption: submitit asks Slurm for `--signal=USR2@90` (SIGUSR2 90 s before the limit). The job's
child ignores SIGUSR2; submitit's handler calls `MatrixJob.checkpoint`, which sends the child SIGTERM (training
finishes its step and saves a checkpoint, `fplus.train.recipe`), waits for it and returns the same job, which
submitit requeues (`scontrol requeue`, at most 3 times for time limits): the requeued job resumes the run from
that checkpoint because `run_one` resumes partial runs. Slurm's own SIGTERM (preemption, scancel) reaches every
process of the job, the child included, which then saves on its own: `checkpoint` then only waits for it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.markup import escape

from fplus.errors import ConfigError, FplusError
from fplus.io import read_json, write_text_atomic
from fplus.matrix import worker
from fplus.matrix.devices import CUDA_VISIBLE, accelerate_config
from fplus.matrix.local import LAUNCH_ENV_DROP, MatrixInterrupted, free_port
from fplus.matrix.pipeline import REPORT_PENDING, MatrixOutcome, needs_work
from fplus.matrix.table import Row, render
from fplus.rundir import run_dir_for
from fplus.settings import RunSettings, Settings
from fplus.signals import signal_exit, sigterm_as_interrupt

SLURM_DIR = "slurm"
JOBS_FILE = "jobs.json"
SIGNAL_DELAY_S = 90
CHECKPOINT_WAIT_S = 80  # how long `checkpoint` waits for the child to save (below SIGNAL_DELAY_S)
POLL_S = 5.0
RESULT_GRACE_S = 30.0  # a job Slurm says has ended may show its result file (a shared filesystem) this much later
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
          "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "PREEMPTED"}
INSTALL = 'install the `slurm` extra: pip install -e ".[slurm]"'


def slurm_dir(settings: Settings) -> Path:
    return Path(settings.train.output_dir) / SLURM_DIR


def slurm_reachable() -> bool:
    """sbatch, squeue and scontrol are on PATH and the controller answers."""
    if not all(shutil.which(c) for c in ("sbatch", "squeue", "scontrol")):
        return False
    try:
        return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def job_state(job_id: str) -> str:
    """The job's Slurm state (PENDING, RUNNING, COMPLETED, FAILED, ...): scontrol (jobs the controller still holds),
    else sacct (accounting), else UNKNOWN."""
    for command, parse in ((["scontrol", "show", "job", "-o", job_id], _scontrol_state),
                           (["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id], _sacct_state)):
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        state = parse(done.stdout) if done.returncode == 0 else None
        if state:
            return state
    return "UNKNOWN"


def _scontrol_state(text: str) -> str | None:
    for token in text.split():
        if token.startswith("JobState="):
            return token.removeprefix("JobState=")
    return None


def _sacct_state(text: str) -> str | None:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0].split()[0] if lines else None  # "CANCELLED by 0" -> CANCELLED


def read_jobs(settings: Settings) -> dict[str, dict]:
    """OUTPUT_DIR/slurm/jobs.json: run name -> {"job_id", "submitted"} (empty when nothing was submitted)."""
    path = slurm_dir(settings) / JOBS_FILE
    if not path.is_file():
        return {}
    jobs = read_json(path, "the matrix's Slurm job records", "delete it if no job of this matrix is running")
    if not isinstance(jobs, dict):
        raise ConfigError(f"{path} is not a job record (run name -> job); delete it if no job of this matrix runs")
    return jobs


def _record_job(settings: Settings, name: str, job_id: str) -> None:
    jobs = read_jobs(settings)
    jobs[name] = {"job_id": job_id, "submitted": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_text_atomic(slurm_dir(settings) / JOBS_FILE, json.dumps(jobs, indent=1))


def active_jobs(settings: Settings, names: list[str]) -> dict[str, str]:
    """Runs among `names` whose recorded job is still pending or running (run -> job id); Slurm is asked only when
    there are records."""
    jobs = {n: j["job_id"] for n, j in read_jobs(settings).items() if n in names}
    if not jobs or not slurm_reachable():
        return {}
    return {n: job for n, job in jobs.items() if job_state(job) in ACTIVE}


def slurm_parameters(run: RunSettings, name: str) -> dict:
    """The submitit SlurmExecutor parameters of one run's job (sbatch options: job name, partition, time, GPUs,
    CPUs, memory, account, one task on one node, SIGUSR2 90 s before the limit)."""
    params: dict = {"job_name": f"fplus-{name}", "time": run.slurm_time_min, "nodes": 1, "ntasks_per_node": 1,
                    "signal_delay_s": SIGNAL_DELAY_S}
    if run.slurm_partition:
        params["partition"] = run.slurm_partition
    if run.slurm_account:
        params["account"] = run.slurm_account
    if run.slurm_gpus_per_job:
        params["gpus_per_node"] = run.slurm_gpus_per_job
    if run.slurm_cpus_per_job:
        params["cpus_per_task"] = run.slurm_cpus_per_job
    if run.slurm_mem_gb:
        gb = run.slurm_mem_gb
        params["mem"] = f"{int(gb)}GB" if gb == int(gb) else f"{int(gb * 1024)}MB"
    return params


class MatrixJob:
    """The callable a Slurm job runs (pickled by submitit): one run's worker in a child process, and `checkpoint`
    for submitit's requeue on SIGUSR2 (see the module docstring). Returns the worker's result
    ({"status", "did_work"}); an FplusError (with the log) when the worker fails."""

    def __init__(self, name: str, job: Path, cwd: Path, gpus: int, accelerate: Path | None, hint: str):
        self.name, self.job, self.cwd, self.gpus, self.accelerate, self.hint = name, job, cwd, gpus, accelerate, hint
        self._process: subprocess.Popen | None = None
        self._term_seen = False

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_process", "_term_seen")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _process=None, _term_seen=False)

    def __call__(self) -> dict:
        processes = max(1, self.gpus)
        command = worker.worker_command(self.job, processes, self.accelerate,
                                        free_port() if processes > 1 else None, self.hint)
        env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV_DROP}
        env.update({"PYTHONUNBUFFERED": "1", "COLUMNS": env.get("COLUMNS", "160"), worker.PARENT_ENV: str(os.getpid())})
        if not self.gpus:
            env[CUDA_VISIBLE] = ""  # a CPU job: no GPU of the submitting machine's environment
        _, settings = worker.read_job(self.job)
        log_path = worker.log_file(settings, self.name)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        preempt = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
        signal.signal(signal.SIGTERM, self._on_sigterm)  # instead of submitit's bypass: Slurm's SIGTERM hits all
        with log_path.open("a", encoding="utf-8") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} fplus matrix: {self.name} in Slurm job "
                      f"{os.environ.get('SLURM_JOB_ID', '?')} on {os.uname().nodename} ===\n")
            log.flush()
            handler = signal.signal(preempt, signal.SIG_IGN)  # the child inherits "ignore"; we keep submitit's
            try:
                self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, cwd=self.cwd, env=env)
            finally:
                signal.signal(preempt, handler)
            rc = _wait(self._process)
        result = worker.read_result(self.job) if rc == 0 else None
        if result is None and rc == 143 and self._term_seen:
            time.sleep(SIGNAL_DELAY_S)  # preemption: Slurm requeues the job, or submitit's SIGUSR2 comes and does
        if result is None:
            why = f"exit status {rc}" + (" (stopped by SIGTERM; resumable)" if rc == 143 else "")
            raise FplusError(f"{self.name}: the worker failed ({why}); see {log_path}")
        return result

    def _on_sigterm(self, signum, frame) -> None:
        self._term_seen = True  # Slurm signalled the whole job step, the child included: it saves by itself
        print(f"fplus: {self.name}: SIGTERM; the worker saves a checkpoint and stops", file=sys.stderr, flush=True)

    def checkpoint(self):
        """submitit's hook on SIGUSR2 (time limit, preemption): stop the worker (SIGTERM: it saves a checkpoint,
        unless Slurm's SIGTERM already reached it), wait for it, and hand back the same job to requeue."""
        from submitit.helpers import DelayedSubmission

        process = self._process
        if process is not None and process.poll() is None:
            if not self._term_seen:
                process.send_signal(signal.SIGTERM)
            _wait(process, CHECKPOINT_WAIT_S)
        return DelayedSubmission(MatrixJob(self.name, self.job, self.cwd, self.gpus, self.accelerate, self.hint))


def _wait(process: subprocess.Popen, timeout: float | None = None) -> int | None:
    """Poll until `process` ends (a signal handler may poll it too: `Popen.wait` would hold its lock)."""
    end = None if timeout is None else time.monotonic() + timeout
    while (rc := process.poll()) is None:
        if end is not None and time.monotonic() > end:
            return None
        time.sleep(0.2)
    return rc


def _submitit():
    try:
        import submitit
    except ImportError:
        raise ConfigError(f"MATRIX_LAUNCHER=slurm needs submitit; {INSTALL}") from None
    return submitit


def _executor(settings: Settings, name: str):
    submitit = _submitit()
    if not shutil.which("sbatch"):
        raise ConfigError("MATRIX_LAUNCHER=slurm: sbatch is not on PATH; run the matrix on a Slurm login node")
    executor = submitit.SlurmExecutor(folder=slurm_dir(settings) / "submitit" / "%j")
    executor.update_parameters(**slurm_parameters(settings.run, name))
    return executor


def submit_run(name: str, settings: Settings, hint: str):
    """Submit one run as a job (its job file written first) and record its id; returns the submitit job."""
    run = settings.run
    accelerate = accelerate_config(run.accelerate_config).resolve() if run.slurm_gpus_per_job > 1 else None
    job = worker.write_job(worker.job_file(settings, name), name, settings).resolve()
    executor = _executor(settings, name)
    submitted = executor.submit(MatrixJob(name, job, Path.cwd(), run.slurm_gpus_per_job, accelerate, hint))
    _record_job(settings, name, submitted.job_id)
    return submitted


def run_slurm(base: Settings, ready: dict[str, Settings], outcome: MatrixOutcome, console: Console,
              wait: bool = True) -> MatrixOutcome:
    """Submit the runs of `ready` that have work left (or wait for their job still in the queue), then, with
    `wait`, follow them in a live table until all end and write the report; FplusError naming failed jobs."""
    from fplus.matrix.pipeline import finish_matrix

    submitit = _submitit()

    hint = ("a requeued job resumes it by itself; else run `fplus matrix --launcher slurm` again "
            "(`fplus matrix --status` shows the jobs)")
    running = active_jobs(base, list(ready))
    jobs, rows = {}, {}
    for name, settings in ready.items():
        rows[name] = Row(name, run_dir_for(settings), worker.log_file(settings, name))
        if name in running:
            jobs[name] = submitit.SlurmJob(folder=slurm_dir(settings) / "submitit" / "%j", job_id=running[name])
            console.print(f"{escape(name)}: already in Slurm job {running[name]}; waiting for it")
        elif needs_work(settings):
            jobs[name] = submit_run(name, settings, hint)
            console.print(f"{escape(name)}: submitted Slurm job {jobs[name].job_id}")
        else:
            outcome.runs[name] = rows[name].state = "complete"
            continue
        rows[name].state, rows[name].where, rows[name].started = "submitted", f"job {jobs[name].job_id}", time.time()
    pending = Path(base.train.output_dir) / REPORT_PENDING
    if jobs:
        write_text_atomic(pending, "jobs submitted; the next `fplus matrix` or `fplus report` writes the report\n")
    if not wait:
        console.print(f"{len(jobs)} job(s) in Slurm; `fplus matrix --status` shows them, and once they end "
                      "`fplus matrix --launcher slurm` (or `fplus report`) writes the report")
        for name in jobs:
            outcome.runs[name] = "submitted"
        outcome.did_work |= bool(jobs)
        return outcome
    failures = _follow(jobs, rows, outcome, console)
    finished = {name: s for name, s in ready.items() if name not in failures}
    outcome = finish_matrix(base, finished, outcome, console)
    if failures:
        raise FplusError(f"{len(failures)} of {len(ready)} Slurm jobs failed: "
                         + "; ".join(f"{n}: {why}" for n, why in failures.items())
                         + "; fix the cause and run `fplus matrix --launcher slurm` again")
    return outcome


def _follow(jobs: dict, rows: dict[str, Row], outcome: MatrixOutcome, console: Console) -> dict[str, str]:
    """Poll the jobs until every one has ended, the live table updated; returns the failures (run -> why)."""
    failures: dict[str, str] = {}
    left = dict(jobs)

    def table():
        return render(list(rows.values()), title=f"matrix: {len(jobs)} Slurm job(s)")

    with sigterm_as_interrupt():
        try:
            with Live(table(), console=console, refresh_per_second=1, transient=False) as live:
                while left:
                    for name, job in list(left.items()):
                        state = job_state(job.job_id)
                        if not _has_result(job):
                            rows[name].state = state.lower()
                            if state in ACTIVE or state == "UNKNOWN":
                                continue
                            if time.time() - rows[name].extra.setdefault("ended_at", time.time()) < RESULT_GRACE_S:
                                continue
                        del left[name]
                        rows[name].ended = time.time()
                        rows[name].state = outcome.runs[name] = _ended(name, job, state, rows[name], failures)
                        if name in failures:
                            console.print(f"[bold red]{escape(name)} failed: {escape(failures[name])}")
                        else:
                            outcome.did_work = True
                    live.update(table())
                    if left:
                        time.sleep(POLL_S)
            if not console.is_terminal:
                console.line()
        except KeyboardInterrupt as err:
            signame, status = signal_exit(err)
            still = ", ".join(f"{n}: job {j.job_id}" for n, j in left.items())
            message = (f"{signame}: stopped waiting; the jobs go on in Slurm ({still}); `fplus matrix --status` "
                       "shows them, `fplus matrix --launcher slurm` waits again and writes the report")
            console.print(escape(message), style="bold yellow", soft_wrap=True)
            raise MatrixInterrupted(status - 128, message) from None
    return failures


def _has_result(job) -> bool:
    """The job wrote its result file (submitit's; `job.done()` would also ask sacct, absent without accounting)."""
    return job.paths.result_pickle.exists()


def _ended(name: str, job, state: str, row: Row, failures: dict[str, str]) -> str:
    """The outcome of a job that ended: the worker's status, or `failed` (the reason into `failures`)."""
    if _has_result(job):
        try:
            return job.result()["status"]
        except Exception as err:  # noqa: BLE001 -- submitit re-raises the job's error with its traceback
            last = [line for line in str(err).splitlines() if line.strip()]
            failures[name] = f"job {job.job_id}: {last[-1] if last else type(err).__name__}; log {row.log}"
            return "failed"
    failures[name] = f"job {job.job_id} ended {state} without a result; log {row.log}"
    return "failed"
