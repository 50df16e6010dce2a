"""Closed-loop episodes in parallel processes (EVAL_PROCESSES): the episodes as jobs, and a pool of stateful workers
fed jobs as they become runnable.

    jobs = episode_jobs(plan)                         # EpisodeJob: task, mode, chunking setting, episode index
    with JobPool(processes, make_runner, describe) as pool:
        for job, result in pool.run(jobs, needs):     # in the order the jobs finish
            ...

`make_runner()` builds a runner: `runner(job, needed) -> result` (`needed`: the result of the job `needs(job)`
names, None when it names none) and `runner.close()`. With one process the runner is built here and the jobs run
in list order (a needed job must come earlier in the list). With N > 1, N workers are started from the "spawn"
context (fresh interpreters: never a fork of a process whose torch, MuJoCo or EGL state is initialised), each sets
`torch.set_num_threads(max(1, cpus // N))` and builds its own runner once (the closed loop's: the policy loaded
from the run, one env at a time), and the parent hands the first runnable job of the list (one whose needed job
has finished) to each free worker. Jobs and results travel pickled (plain pickle: tensors as bytes), so a result
is the same in either case when it depends only on its job and its needed result.

Failures: an exception in a worker (building its runner or running a job) raises FplusError naming the job and the
worker (the exception's own class when it is an FplusError), caused by a `WorkerTraceback` holding the worker's
traceback text; a worker that dies without a word (a crash, the OOM killer) raises FplusError naming the job and
the exit status. On these, on Ctrl-C (KeyboardInterrupt, noted with the jobs in flight) and on any other error in
the parent, every worker is terminated before the error propagates. Workers ignore SIGINT: Ctrl-C in a terminal
reaches the whole process group, and the parent stops them.

Spawned workers import the parent's main module (as `__mp_main__`): a script that evaluates with EVAL_PROCESSES > 1
needs the usual `if __name__ == "__main__":` guard (the `fplus` command and `python -m` entry points have it);
without it a worker exits with status 1, which the error names.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from fplus.errors import ConfigError, FplusError

if TYPE_CHECKING:
    import torch

    from fplus.eval.closed_loop import ChunkingStats, _Plan

J = TypeVar("J")
R = TypeVar("R")

START_METHOD = "spawn"
STOP_TIMEOUT_S = 10.0
"""How long a worker may take to close its runner after the last job before it is terminated."""


@dataclass(frozen=True)
class EpisodeJob:
    """One closed-loop episode: task `plan.tasks[task]` under `mode`, its chunks scheduled by (`strategy`,
    `delay`), episode `index` (layout seed + index; its corruption and noise draws from a generator seeded with
    seed + index, so that an episode does not depend on which ran before it, nor in which process)."""

    task: int
    mode: str
    strategy: str
    delay: int
    index: int

    @property
    def standard(self) -> bool:
        return (self.strategy, self.delay) == ("sync", 0)

    @property
    def label(self) -> str:
        return self.mode if self.standard else f"{self.strategy}-d{self.delay}"

    def describe(self, plan: _Plan, seed: int) -> str:
        return (f"closed-loop episode {self.index} of {plan.tasks[self.task].name} under {self.label} (layout seed "
                f"{seed + self.index})")


@dataclass
class EpisodeOutcome:
    """What an episode gives the results: success, the scheduler's counts, the Prophet's memory (1, K, D) of each
    chunk (the standard `none` episodes', for `shuffle`)."""

    success: bool
    stats: ChunkingStats
    memory: list[torch.Tensor] | None


def episode_groups(plan: _Plan) -> list[tuple[str, str, int, int]]:
    """(mode, strategy, delay, episodes) of a task's groups of episodes, in order: the modes of `plan.ordered`
    under sync/0 (`none` first: its memories feed `shuffle`), then each latency setting under `none`."""
    return [(m, "sync", 0, plan.episodes_for[m]) for m in plan.ordered] + \
        [("none", s, d, plan.episodes_for["none"]) for s, d in plan.latency]


def episode_jobs(plan: _Plan) -> list[EpisodeJob]:
    """Every episode to roll out, task by task in `episode_groups` order (oracle rolls nothing out). ConfigError
    when `shuffle` would have fewer than 2 rollouts to take memories from."""
    if "shuffle" in plan.ordered and plan.episodes_for["none"] < 2:
        raise ConfigError("closed-loop shuffle needs at least 2 episodes per task")
    return [EpisodeJob(t, mode, strategy, delay, e) for t in range(len(plan.tasks))
            for mode, strategy, delay, n in episode_groups(plan) if mode != "oracle" for e in range(n)]


def needed_episode(plan: _Plan, job: EpisodeJob) -> EpisodeJob | None:
    """The episode whose memory `job` injects: `shuffle` episode e takes the `none` episode e + 1's (cyclically)."""
    if job.mode != "shuffle":
        return None
    return EpisodeJob(job.task, "none", "sync", 0, (job.index + 1) % plan.episodes_for["none"])


class Runner(Protocol[J, R]):
    def __call__(self, job: J, needed: R | None) -> R: ...

    def close(self) -> None: ...


class WorkerTraceback(Exception):
    """The traceback text of an exception raised in a worker process (the cause of the parent's FplusError)."""

    def __str__(self) -> str:
        return str(self.args[0])


def threads_per_worker(processes: int) -> int:
    """torch threads of each of `processes` workers: an equal share of the CPUs this process may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // processes)


class JobPool(Generic[J, R]):
    """Runs jobs with `make_runner`'s runner in `processes` processes (1: here); see the module doc.
    `describe(job)` names a job in errors, e.g. "episode 3 of push-v3 under zero"."""

    def __init__(self, processes: int, make_runner: Callable[[], Runner[J, R]], describe: Callable[[J], str]):
        if processes < 1:
            raise ValueError(f"processes must be at least 1, got {processes}")
        self.processes, self.make_runner, self.describe = processes, make_runner, describe
        self._workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
        self._runner: Runner[J, R] | None = None  # the runner of one process

    def __enter__(self) -> JobPool[J, R]:
        return self

    def __exit__(self, kind, error, tb) -> None:
        self.close(graceful=kind is None)

    def run(self, jobs: Sequence[J], needs: Callable[[J], J | None]) -> Iterator[tuple[J, R]]:
        """(job, result) of every job as it finishes."""
        if self.processes == 1:
            yield from self._run_here(jobs, needs)
        else:
            yield from self._run_workers(jobs, needs)

    def _run_here(self, jobs: Sequence[J], needs: Callable[[J], J | None]) -> Iterator[tuple[J, R]]:
        results: dict[J, R] = {}
        self._runner = self._runner or self.make_runner()
        for job in jobs:
            needed = needs(job)
            results[job] = self._runner(job, None if needed is None else results[needed])
            yield job, results[job]

    def _run_workers(self, jobs: Sequence[J], needs: Callable[[J], J | None]) -> Iterator[tuple[J, R]]:
        pending, results = list(jobs), {}
        busy: dict[int, J] = {}  # worker index -> the job it runs
        self._start(min(self.processes, len(pending)))
        try:
            while pending or busy:
                for index in [i for i in range(len(self._workers)) if i not in busy]:
                    job = next((j for j in pending if needs(j) is None or needs(j) in results), None)
                    if job is None:
                        break
                    pending.remove(job)
                    busy[index] = job
                    needed = needs(job)
                    try:
                        self._workers[index][1].send_bytes(pickle.dumps((job, results.get(needed))))
                    except OSError:  # it died between two jobs
                        raise self._death(index, job) from None
                if not busy:
                    raise ValueError(f"jobs wait for jobs that are not in the list: {pending[:3]}")  # a caller's bug
                for index in self._ready(busy):
                    job = busy.pop(index)
                    results[job] = self._receive(index, job)
                    yield job, results[job]
        except KeyboardInterrupt as err:
            if busy:
                err.add_note("interrupted while rolling out " + "; ".join(self.describe(j) for j in busy.values()))
            raise

    def _start(self, count: int) -> None:
        context = multiprocessing.get_context(START_METHOD)
        threads = threads_per_worker(count)
        for index in range(count):
            parent, child = context.Pipe()
            process = context.Process(target=_worker_main, args=(child, self.make_runner, threads),
                                      name=f"fplus-eval-{index + 1}", daemon=True)
            process.start()
            child.close()
            self._workers.append((process, parent))

    def _ready(self, busy: dict[int, J]) -> list[int]:
        """The busy workers that sent a message or died (waits for one)."""
        by_object: dict[Any, int] = {}
        for index in busy:
            process, conn = self._workers[index]
            by_object[conn] = by_object[process.sentinel] = index
        return sorted({by_object[o] for o in wait(list(by_object))})

    def _where(self, index: int) -> str:
        return f"worker process {index + 1} of {len(self._workers)} (pid {self._workers[index][0].pid})"

    def _receive(self, index: int, job: J) -> R:
        conn = self._workers[index][1]
        try:
            if not conn.poll():  # woken by its sentinel: it died without a word
                raise EOFError
            status, *payload = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            raise self._death(index, job) from None
        if status == "done":
            return payload[0]
        kind, text, trace = payload
        message = f"{self.describe(job)} failed in {self._where(index)}: {text}"
        try:
            error = (kind or FplusError)(message)
        except TypeError:  # an FplusError class that takes other arguments
            error = FplusError(message)
        raise error from WorkerTraceback(trace)

    def _death(self, index: int, job: J) -> FplusError:
        process = self._workers[index][0]
        process.join(1.0)
        code = process.exitcode
        how = f"was killed by signal {signal.Signals(-code).name}" if code is not None and code < 0 and \
            -code in signal.valid_signals() else f"exited with status {code}"
        return FplusError(f"{self._where(index)} {how} while rolling out {self.describe(job)}; the other workers "
                          "were stopped (EVAL_PROCESSES=1 rolls the episodes out in this process, where the error "
                          "shows)")

    def close(self, graceful: bool = False) -> None:
        """Close the runner of one process; stop every worker (`graceful`: asked to close its runner first)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.close()
        workers, self._workers = self._workers, []
        for process, conn in workers:
            if graceful and process.is_alive():
                try:
                    conn.send_bytes(pickle.dumps(None))
                except OSError:
                    pass
        for process, conn in workers:
            if graceful:
                process.join(STOP_TIMEOUT_S)
            if process.is_alive():
                process.terminate()
                process.join(5.0)
            if process.is_alive():
                process.kill()
                process.join()
            conn.close()


def _worker_main(conn: Connection, make_runner: Callable[[], Runner], threads: int) -> None:
    """A worker: build the runner at the first job, run jobs until told to stop (None) or the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    torch.set_num_threads(threads)
    runner = None
    try:
        while True:
            try:
                message = pickle.loads(conn.recv_bytes())
            except EOFError:
                return
            if message is None:
                return
            job, needed = message
            try:
                if runner is None:
                    runner = make_runner()
                reply = pickle.dumps(("done", runner(job, needed)))
            except Exception as err:  # noqa: BLE001 -- every failure goes to the parent, which names the job
                kind = type(err) if isinstance(err, FplusError) else None
                text = str(err) if kind else f"{type(err).__name__}: {err}"
                reply = pickle.dumps(("error", kind, text, traceback.format_exc()))
            conn.send_bytes(reply)
    finally:
        if runner is not None:
            runner.close()
