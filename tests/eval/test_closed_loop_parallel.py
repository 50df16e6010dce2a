"""Closed-loop episodes in parallel processes (EVAL_PROCESSES, fplus.eval.parallel): the pool with toy runners in
spawned workers (results, order of needed jobs, a worker's exception and death, Ctrl-C), then a tiny Meta-World run
whose results file, episodes and videos are the same bit for bit with 1 and 2 processes, and a worker that cannot
load the policy."""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import signal
import threading
import time

import pytest

from fplus.errors import DataError, FplusError
from fplus.eval.parallel import JobPool, WorkerTraceback


class ToyRunner:
    """Job j: (j, the needed job's value, its own value 10 j + 1, the pid); raises DataError at `fail`, exits the
    process at `die`, hangs at `hang`."""

    def __init__(self, fail: int | None = None, die: int | None = None, hang: int | None = None):
        self.fail, self.die, self.hang = fail, die, hang

    def __call__(self, job: int, needed):
        if job == self.fail:
            raise_for(job)
        if job == self.die:
            os._exit(3)
        if job == self.hang:
            time.sleep(600)
        return job, None if needed is None else needed[2], 10 * job + 1, os.getpid()

    def close(self) -> None:
        pass


def raise_for(job: int):
    raise DataError(f"job {job} found a damaged file")


def needs(job: int) -> int | None:
    return job - 4 if job >= 4 else None  # job j waits for job j - 4's result


def describe(job: int) -> str:
    return f"toy job {job}"


def _run(processes: int, jobs=range(8), **runner) -> list[tuple]:
    with JobPool(processes, functools.partial(ToyRunner, **runner), describe) as pool:
        return [result for _, result in pool.run(list(jobs), needs)]


def _no_workers_left() -> bool:
    return multiprocessing.active_children() == []


def test_two_workers_give_the_results_of_one_process():
    here = _run(1)
    there = _run(2)
    assert {r[0]: r[:3] for r in there} == {r[0]: r[:3] for r in here}
    assert here[5] == (5, 11, 51, os.getpid())  # job 5 got job 1's result
    assert len({r[3] for r in there}) == 2 and os.getpid() not in {r[3] for r in there}
    assert _no_workers_left()


def test_a_worker_exception_names_the_job_and_carries_its_traceback():
    with pytest.raises(DataError, match=r"^toy job 5 failed in worker process [12] of 2 \(pid \d+\): job 5 found "
                                        r"a damaged file$") as info:
        _run(2, fail=5)
    cause = info.value.__cause__
    assert isinstance(cause, WorkerTraceback)
    assert "Traceback (most recent call last)" in str(cause) and "in raise_for" in str(cause)
    assert _no_workers_left()


def test_a_worker_that_dies_is_named_and_the_others_are_stopped():
    start = time.monotonic()
    with pytest.raises(FplusError, match=r"worker process [12] of 2 \(pid \d+\) exited with status 3 while rolling "
                                         r"out toy job 2; the other workers were stopped"):
        _run(2, die=2, hang=3)  # the other worker hangs in job 3: it is terminated, not waited for
    assert _no_workers_left() and time.monotonic() - start < 60


def test_ctrl_c_terminates_the_workers_and_names_the_jobs_in_flight():
    # Python's own SIGINT handler (KeyboardInterrupt), whatever an earlier test or pytest left installed
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            _run(2, jobs=[0], hang=0)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert info.value.__notes__ == ["interrupted while rolling out toy job 0"]
    assert _no_workers_left()


# ----- a tiny trained run in Meta-World -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def e2_run(tmp_path_factory):
    pytest.importorskip("metaworld")
    from fplus.rundir import run_dir_for
    from tests.eval.test_closed_loop import tiny_metaworld_run

    return run_dir_for(tiny_metaworld_run(tmp_path_factory.mktemp("parallel"), demo_max_steps=12))


@pytest.mark.slow
def test_two_processes_give_the_results_of_one_bit_for_bit(e2_run, tmp_path, monkeypatch):
    """Every mode (shuffle takes other episodes' memories), a latency sweep and videos: the results file, every
    episode's outcome (success, steps, smoothness sums, memories) and the videos are the same."""
    import fplus.eval.closed_loop as closed_loop

    outcomes = []
    cells = closed_loop._task_cells
    monkeypatch.setattr(closed_loop, "_task_cells", lambda plan, task, got: outcomes.append(got) or
                        cells(plan, task, got))
    files = {}
    for processes in (1, 2):
        _, path = closed_loop.evaluate_closed_loop(
            e2_run, "metaworld", None, episodes=3, corrupted_episodes=2, progress=False, processes=processes,
            modes=("none", "zero", "random", "shuffle", "oracle", "history"), inference_delay=2, chunking="rtc",
            video_dir=tmp_path / f"videos-{processes}")
        files[processes] = path.read_bytes()
        path.unlink()  # not merged into the next evaluation
    assert files[2] == files[1]
    saved = json.loads(files[1])
    assert saved["latency"]["rtc"]["2"]["overall"]["steps"] == 3 * 12  # 3 episodes of 12 steps were rolled out
    serial, parallel = outcomes
    assert list(parallel) != list(serial)  # finished in another order ...
    assert len(serial) == 3 + 4 * 2 + 3  # none, 4 diagnostic modes (oracle rolls nothing out), rtc with d = 2
    for job, one in serial.items():  # ... with the same outcomes
        two = parallel[job]
        assert (one.success, one.stats) == (two.success, two.stats), job
        assert (one.memory is None) == (two.memory is None) and all(
            a.equal(b) for a, b in zip(one.memory or [], two.memory or [], strict=True)), job
    assert len(serial[closed_loop.EpisodeJob(0, "none", "sync", 0, 0)].memory) == 6  # a chunk every 2 of 12 steps
    videos = sorted(p.name for p in (tmp_path / "videos-1").iterdir())
    assert len(videos) == 6 and "reach-v3-rtc-d2-ep0.mp4" in videos
    for name in videos:
        assert (tmp_path / "videos-2" / name).read_bytes() == (tmp_path / "videos-1" / name).read_bytes(), name


@pytest.mark.slow
def test_a_worker_that_cannot_load_the_policy_names_the_episode(e2_run, monkeypatch):
    """The checkpoint is damaged after this process loaded it: the workers' own loading fails."""
    import fplus.eval.closed_loop as closed_loop
    from fplus.model.policy import CONFIG_FILE

    damaged = []
    plan = closed_loop._plan

    def plan_then_damage(simulator, loaded, *args):
        config = loaded.policy_dir / CONFIG_FILE
        damaged.append((config, config.read_bytes()))
        config.write_text("{")
        return plan(simulator, loaded, *args)

    monkeypatch.setattr(closed_loop, "_plan", plan_then_damage)
    try:
        with pytest.raises(FplusError, match=r"^closed-loop episode [01] of reach-v3 under none \(layout seed "
                                                  r"100[01]\) failed in worker process [12] of 2 \(pid \d+\): .*"
                                                  r"config.json.*the checkpoint is damaged") as info:
            closed_loop.evaluate_closed_loop(e2_run, "metaworld", None, episodes=2, modes=("none",), progress=False,
                                             processes=2)
    finally:
        config, text = damaged[0]
        config.write_bytes(text)
    assert "in _worker_runner" in str(info.value.__cause__)
    assert _no_workers_left()
    assert not list((e2_run / "eval").glob("sim-metaworld-*.json"))  # no results file from a failed evaluation
