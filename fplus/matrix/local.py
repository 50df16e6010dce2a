"""The matrix on one machine with several devices: one worker process per MATRIX_DEVICES slot at a time.

    slots = cuda:0, cuda:1 -> run A on cuda:0, run B on cuda:1; the next run goes to the first slot that frees up

Each run is a `python -m fplus.matrix.worker JOB` process (a slot of n GPUs: `accelerate launch --num_processes n`
with MATRIX_ACCELERATE_CONFIG), pinned by CUDA_VISIBLE_DEVICES, in a session of its own (so the terminal's Ctrl-C
reaches the matrix only), its output in OUTPUT_DIR/logs/<run>.log (appended to). A live table shows every run.
A run that fails is reported with the end of its log and the others go on; the matrix then writes the report
over the runs that finished and raises an FplusError naming the failures. SIGINT/SIGTERM: every running worker
gets the signal once (it finishes its step, saves a checkpoint, exits), no new run starts, and `MatrixInterrupted`
(exit status 130/143) says how to resume; a second signal is passed on too (the workers then stop at once).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.markup import escape

from fplus.errors import FplusError
from fplus.matrix import worker
from fplus.matrix.devices import Slot, accelerate_config
from fplus.matrix.pipeline import MatrixOutcome, default_resume_hint, needs_work
from fplus.matrix.table import Row, log_tail, render
from fplus.rundir import COMPLETE, run_dir_for
from fplus.settings import Settings
from fplus.signals import signal_exit, sigterm_as_interrupt

POLL_S = 0.5
LAUNCH_ENV_DROP = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""The parent's own distributed variables never reach a worker (its launcher sets its own)."""


class MatrixInterrupted(SystemExit):
    """SIGINT/SIGTERM stopped the matrix; its runs are resumable. Exit status 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(128 + signum)
        self.signum, self.message = signum, message


@dataclass
class _Worker:
    name: str
    slot_index: int
    process: subprocess.Popen
    log: object  # the open log file
    signals_sent: int = 0


def free_port() -> int:
    """A TCP port free on this machine now (the rendezvous of one multi-GPU run)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_threads(slots: list[Slot], cpus: int | None = None) -> int:
    """The torch threads of a worker on a cpu slot: the machine's cores shared by the cpu slots (at least 1), so
    that side-by-side runs do not oversubscribe the cores (two runs of 2 threads on 2 cores run their many small
    ops several times slower than two of 1 thread; docs/training.md, Seeds)."""
    cpu_slots = sum(1 for s in slots if not s.gpus)
    return max(1, (cpus or os.cpu_count() or 1) // max(1, cpu_slots))


def worker_environ(slot: Slot, parent: dict[str, str] | None = None, threads: int | None = None) -> dict[str, str]:
    """The environment of a worker on `slot`: the parent's, pinned to the slot's devices, without the parent's
    distributed variables, unbuffered output, and FPLUS_MATRIX_PARENT (the worker stops when the matrix dies). A cpu
    slot's worker gets OMP_NUM_THREADS=`threads` (`cpu_threads`) unless the parent sets OMP_NUM_THREADS itself."""
    parent = dict(os.environ if parent is None else parent)
    env = {k: v for k, v in parent.items() if k not in LAUNCH_ENV_DROP}
    env.update(slot.environ(parent))
    if not slot.gpus and threads is not None and "OMP_NUM_THREADS" not in parent:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update({"PYTHONUNBUFFERED": "1", "COLUMNS": env.get("COLUMNS", "160"),
                worker.PARENT_ENV: str(os.getpid())})
    return env


def start_worker(name: str, settings: Settings, slot: Slot, hint: str,
                 accelerate: Path | None, threads: int | None = None) -> tuple[subprocess.Popen, object]:
    """Write the run's job file and start its worker on `slot` (`threads`: see `worker_environ`), output appended to
    its log. Returns the process and the open log file (closed by the caller when the process ends)."""
    job = worker.write_job(worker.job_file(settings, name), name, settings, slot.eval_device(settings.eval.device))
    command = worker.worker_command(job, slot.processes, accelerate, free_port() if slot.processes > 1 else None,
                                    hint)
    log_path = worker.log_file(settings, name)
    log = log_path.open("a", encoding="utf-8")
    now = time.time()
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))} fplus matrix: {name} on "
              f"{slot.label} (launched at {now:.3f}) ===\n")
    log.flush()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env=worker_environ(slot, threads=threads), start_new_session=True)
    return process, log


def run_parallel(base: Settings, ready: dict[str, Settings], outcome: MatrixOutcome, slots: list[Slot],
                 console: Console) -> tuple[MatrixOutcome, dict[str, str]]:
    """Run `ready` over `slots` (see the module docstring). Returns the outcome (per run `trained`, `resumed`,
    `complete` or `failed`) and the failures (run name -> one line with its log)."""
    accelerate = accelerate_config(base.run.accelerate_config) if any(s.processes > 1 for s in slots) else None
    hint = default_resume_hint()
    rows = {name: Row(name, run_dir_for(s), worker.log_file(s, name)) for name, s in ready.items()}
    queue = deque(name for name, s in ready.items() if needs_work(s))
    for name in ready:
        if name not in queue:  # nothing left to do: no worker to start
            rows[name].state = outcome.runs[name] = "complete"
    free = deque(range(len(slots)))
    running: dict[str, _Worker] = {}
    failures: dict[str, str] = {}

    def table():
        return render(list(rows.values()), title=f"matrix: {len(ready)} runs on {', '.join(s.label for s in slots)}")

    def reap(stopping: bool) -> None:
        for name, w in list(running.items()):
            rc = w.process.poll()
            if rc is None:
                if rows[name].state == "running" and (rows[name].run_dir / COMPLETE).is_file():
                    rows[name].state = "evaluating"
                continue
            w.log.close()
            del running[name]
            free.append(w.slot_index)
            row = rows[name]
            row.ended = time.time()
            result = worker.read_result(worker.job_file(ready[name], name)) if rc == 0 else None
            if result is not None:
                row.state = outcome.runs[name] = result["status"]
                outcome.did_work |= bool(result["did_work"])
            elif stopping or w.signals_sent:
                row.state = outcome.runs[name] = "stopped"
            else:
                row.state = outcome.runs[name] = "failed"
                why = f"exit status {rc}" + (f" ({signal.Signals(rc - 128).name})" if rc in (130, 143) else
                                             " without a result" if rc == 0 else "")
                failures[name] = f"{why}, log {row.log}"
                console.print(f"[bold red]{escape(name)} failed ({why}); the end of {escape(str(row.log))}:")
                console.print(escape(log_tail(row.log)), soft_wrap=True, highlight=False)

    def launch() -> None:
        while queue and free:
            name = queue.popleft()
            index = free.popleft()
            settings = ready[name]
            process, log = start_worker(name, settings, slots[index], hint, accelerate, cpu_threads(slots))
            running[name] = _Worker(name, index, process, log)
            rows[name].state, rows[name].where, rows[name].started = "running", slots[index].label, time.time()

    interrupted: BaseException | None = None
    with sigterm_as_interrupt():
        try:
            with Live(table(), console=console, refresh_per_second=2, transient=False) as live:
                while queue or running:
                    launch()
                    reap(stopping=False)
                    live.update(table())
                    if queue or running:
                        time.sleep(POLL_S)
                live.update(table())
            if not console.is_terminal:
                console.line()  # Live ends its last render without one off a terminal
        except KeyboardInterrupt as err:
            interrupted = err
        if interrupted is not None:
            _stop_all(running, rows, reap, table, console, interrupted)
    if interrupted is not None:
        signame, status = signal_exit(interrupted)
        message = stopped_message(signame, [rows[n] for n in ready if outcome.runs.get(n) == "stopped"],
                                  list(queue), hint)
        console.print(escape(message), style="bold yellow", soft_wrap=True)
        raise MatrixInterrupted(status - 128, message)
    return outcome, failures


def stopped_message(signame: str, stopped: list[Row], never_started: list[str], hint: str) -> str:
    """The line a matrix prints when a signal stopped it. A stopped run whose training had finished (COMPLETE is
    written) was stopped in its evaluation, which the next matrix runs again; any other saved a checkpoint of the
    step it was on, which the next matrix resumes."""
    evaluating = [r.name for r in stopped if (r.run_dir / COMPLETE).is_file()]
    training = [r.name for r in stopped if r.name not in evaluating]
    parts = []
    if training:
        parts.append(f"stopped {', '.join(training)} (each saved a checkpoint of its last step)")
    if evaluating:
        parts.append(f"stopped {', '.join(evaluating)} while evaluating (training had finished; the evaluation "
                     "runs again)")
    if never_started:
        parts.append(f"never started {', '.join(never_started)}")
    return f"{signame}: matrix stopped; {'; '.join(parts) or 'nothing was running'}; {hint}"


def _stop_all(running: dict[str, _Worker], rows: dict[str, Row], reap, table, console: Console,
              err: BaseException) -> None:
    """Pass the signal of `err` to every running worker once and wait for them; a further signal is passed on too
    (the workers then abort at once)."""
    signum = int(getattr(err, "signum", signal.SIGINT))
    console.print(f"[bold yellow]{signal.Signals(signum).name}: stopping {len(running)} run(s); each saves a "
                  f"checkpoint after its step in progress (a second {signal.Signals(signum).name} stops them at once)")

    def send() -> None:
        for name, w in running.items():
            if w.process.poll() is None:
                w.process.send_signal(signum)
                w.signals_sent += 1
                rows[name].state = "stopping"

    send()
    with sigterm_as_interrupt():
        while running:
            try:
                while running:
                    reap(stopping=True)
                    time.sleep(POLL_S)
            except KeyboardInterrupt:
                send()
    console.print(table())


def raise_failures(failures: dict[str, str], total: int) -> None:
    """The FplusError of a matrix where some runs failed (after the report of the others)."""
    if failures:
        lines = "; ".join(f"{name}: {why}" for name, why in failures.items())
        raise FplusError(f"{len(failures)} of {total} matrix runs failed: {lines}; fix the cause and run the "
                         "matrix again (finished runs are skipped, interrupted ones resumed)")
