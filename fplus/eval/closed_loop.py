"""Closed-loop evaluation: the policy drives a simulator with action chunks; success rate per task and mode.

Per step the policy sees the run's camera frame(s) (Meta-World: corner camera; LIBERO: agentview, plus the
eye-in-hand camera when the run reads a wrist key), the task sentence, the proprio state (when the run uses one) and,
with a world memory, the history of world latents computed online from the main camera by the same encoder settings
as training (each latent from frames seen so far only). It predicts a chunk of H actions and executes the first
`n_action_steps` of them. The simulators sit behind `fplus.sim.registry`.

Online latents are rounded to float16 like the cache's, and the policy standardises them with its own training
statistics, so a frame gets the same standardised latent online as offline.

Corruption modes in closed loop:
    none, zero, random  as offline
    history             z_t repeated: what the present alone gives
    shuffle             the memory predicted at the same step of another rollout (another episode) of the same task
                        (the rollouts' `none` memories, each rollout taking the next one's)
    oracle              not available: the future frames of a live rollout are not observed (reported as n/a)

`none` runs EVAL_EPISODES per task; the other modes EVAL_EPISODES_CORRUPTED (default: as many), so that the
baseline comparison gets a tight interval while the diagnostics stay cheap; the result says how many each used.

Latency (DESIGN 11): the chunks are scheduled by `fplus.deploy.chunking` (the scheduler robots use), with an
inference delay of d control steps simulated (the chunk requested at step t from o_t arrives at t + d; meanwhile
the current chunk's actions continue) and a strategy: sync (the env is not stepped during inference: the
evaluation of old, d = 0), naive (switch to the late chunk at its action d) or rtc (the policy inpaints the d
actions that run during inference). The default, d = 0 sync, is the standard evaluation above. Given other settings
(`inference_delay`, `chunking`: every pair of the two lists), each is rolled out under `none` with EVAL_EPISODES
per task, on the same layouts, and the file gains a `latency` section (`latency_section`):

    "latency": {"<strategy>": {"<d>": {"chunking", "inference_delay", "execution_horizon", "mode": "none",
                                       "tasks": {task: cell}, "overall": cell}}}
    cell = {"successes", "episodes", "rate", "ci95",                  success with the 95% Wilson interval
            "smoothness": {"boundary", "within",                      mean |a_t - a_(t-1)| (mean over action dims,
                           "boundary_transitions", "within_transitions"},  raw units) where a_t comes from another
                                                                      chunk than a_(t-1), and where from the same
            "steps", "idle_steps"}                                    control steps executed; steps the robot
                                                                      would stand still (sync: d per chunk; all:
                                                                      d before the first chunk), over all episodes
The sweep always includes "sync"/"0", taken from the `none` rollouts of the standard evaluation (rolled out for it
when `none` is not among the modes). An earlier file's latency entries (and tasks) are kept unless redone here.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fplus import batch as K
from fplus.deploy.chunking import (
    STRATEGIES,
    SimulatedInference,
    Smoothness,
    check_timing,
    settings_grid,
    supports_inpainting,
)
from fplus.deploy.episode import OnlineLatents, observation_batch
from fplus.errors import ConfigError
from fplus.eval.parallel import EpisodeJob, EpisodeOutcome, JobPool, episode_groups, episode_jobs, needed_episode
from fplus.io import write_text_atomic
from fplus.model.corruption import MODES
from fplus.model.policy import FPlusPolicy
from fplus.rundir import sim_result
from fplus.train.loggers import closed_loop_logger

if TYPE_CHECKING:
    from fplus.data.lerobot import LeRobotDataset
    from fplus.settings import Settings
    from fplus.sim.base import SimTask, Simulator

CLOSED_LOOP_MODES = ("none", "zero", "random", "shuffle", "history")


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class ChunkingStats:
    """What the chunk schedulers of several episodes saw: smoothness of the executed actions, control steps
    executed and idle steps (see `fplus.deploy.chunking`)."""

    smoothness: Smoothness = field(default_factory=Smoothness)
    steps: int = 0
    idle_steps: int = 0

    def add(self, scheduler) -> None:
        self.smoothness = self.smoothness + scheduler.smoothness
        self.steps += scheduler.step
        self.idle_steps += scheduler.idle_steps

    def merge(self, other: ChunkingStats) -> None:
        """Count another's episodes after these (smoothness sums added in that order)."""
        self.smoothness = self.smoothness + other.smoothness
        self.steps += other.steps
        self.idle_steps += other.idle_steps


def rollout(policy: FPlusPolicy, env, instruction: str, episode: int, mode: str, n_action_steps: int,
            latents: OnlineLatents | None, shuffle_source: list[torch.Tensor] | None, generator: torch.Generator,
            record: list[torch.Tensor] | None = None, frames_out: list[np.ndarray] | None = None,
            cameras: tuple[str, ...] = ("image",), inference_delay: int = 0, chunking: str = "sync",
            stats: ChunkingStats | None = None) -> bool:
    """One episode; returns success.

    `env.reset(episode)` picks the initial layout. Every observed main-camera frame enters the online latents
    (the history spacing matches training's consecutive frames). The chunks are scheduled by
    `fplus.deploy.chunking.SimulatedInference` with execution horizon `n_action_steps`, `inference_delay` (control
    steps) and `chunking` (sync | naive | rtc; d = 0 sync: a chunk predicted every `n_action_steps` steps, its
    first `n_action_steps` actions executed). rtc passes the scheduler's prefix to
    `policy.predict(..., prefix=(1, P, A) raw actions, inference_delay=d, execution_horizon=n_action_steps)`; sync
    and naive call `predict` without them. `cameras` are the observation keys the policy reads (the run's image
    key, then its wrist key). `record` collects the Prophet's memory (1, K, D) of each chunk (for `shuffle` of other
    rollouts), `shuffle_source` is another rollout's record (injected instead of this rollout's prediction under
    `shuffle`). `stats` accumulates the scheduler's smoothness and step counts.
    """
    obs = env.reset(episode)
    use_state = policy.config.state_dim is not None
    chunk_index = 0

    def infer(obs: dict, prefix: np.ndarray | None, delay: int) -> np.ndarray:
        nonlocal chunk_index
        batch = policy.processor(observation_batch(obs, cameras, instruction, use_state))  # + the prompt
        if latents is not None:
            batch[K.Z_HIST] = latents.history_window()
        memory = None
        if mode == "shuffle" and policy.injection is not None:
            memory = shuffle_source[min(chunk_index, len(shuffle_source) - 1)]
        inpaint = {} if prefix is None else {
            "prefix": torch.from_numpy(np.ascontiguousarray(prefix, dtype=np.float32))[None],
            "inference_delay": delay, "execution_horizon": n_action_steps}
        prediction = policy.predict(batch, corruption="none" if mode == "shuffle" else mode, generator=generator,
                                    memory=memory, **inpaint)
        if record is not None and prediction.memory is not None:
            record.append(prediction.memory.cpu())
        chunk_index += 1
        return prediction.actions[0].float().cpu().numpy()

    runner = SimulatedInference(infer, n_action_steps, inference_delay, chunking)
    try:
        while True:
            if latents is not None:
                latents.add(obs["image"])
            if frames_out is not None:
                frames_out.append(obs["image"])
            obs, success, done = env.step(runner.act(obs))
            if success:
                return True
            if done:
                return False
    finally:
        if stats is not None:
            stats.add(runner.scheduler)


def evaluate_closed_loop(run_dir: Path, sim: str, tasks: list[str] | None, episodes: int,
                         modes: tuple[str, ...] = CLOSED_LOOP_MODES, n_action_steps: int | None = None,
                         max_steps: int | None = None, step: int | None = None, seed: int = 1000,
                         video_dir: Path | None = None, progress: bool = True, console=None,
                         suite: str | None = None, device: str | None = None,
                         corrupted_episodes: int | None = None, inference_delay: int | Sequence[int] = 0,
                         chunking: str | Sequence[str] = "sync", local: dict | None = None,
                         processes: int | None = None) -> tuple[dict, Path]:
    """Roll the run's checkpoint out in `sim` and write RUN/eval/sim-<sim>-step-XXXXXX.json. An exported model
    folder (fplus export) is rolled out the same way (`fplus.deploy.loader.load_any`, with this machine's `local`
    settings: DATASET, CACHE_DIR, ...), into OUT/eval/ (never hashed), and never logs to W&B (the folder is not
    the training's run directory).

    Args:
        sim: metaworld or libero (the `libero` extra).
        tasks: simulator tasks (Meta-World names; LIBERO indices or names), default: Meta-World the dataset's
            tasks that the simulator knows, LIBERO the whole suite.
        episodes: rollouts per task under `none`; episode e starts from layout `seed + e` (Meta-World: the seed
            of the layout, LIBERO: initial state `(seed + e) mod 50`), the same layouts for every mode.
        corrupted_episodes: rollouts per task under every other mode (default: `episodes`; at most `episodes`).
        n_action_steps: actions executed per predicted chunk (default: half the horizon, at least 1).
        max_steps: policy steps per episode (default: Meta-World DEMO_MAX_STEPS, LIBERO its suite's limit).
        suite: LIBERO suite (default: the run's EVAL_SUITE). device: default the run's EVAL_DEVICE.
        inference_delay, chunking: one or several inference delays (control steps) and chunking strategies (sync,
            naive, rtc); every pair other than (sync, 0) is rolled out under `none` into the `latency` section (see
            the module doc). Default 0, sync: the standard evaluation only.
        processes: the episodes run in this many processes (`fplus.eval.parallel`; default: the run's
            EVAL_PROCESSES); the results do not depend on it (episode e of a task, mode and setting draws from
            its own generator, seeded with `seed + e`).
    """
    from fplus.progress import make_progress
    from fplus.sim.registry import get_simulator

    simulator = get_simulator(sim)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ConfigError(f"unknown corruption modes {bad}; valid: {', '.join(MODES)}")
    loaded = _load(Path(run_dir), step, suite, device, local)
    log = None if loaded.exported else \
        closed_loop_logger(loaded.settings, loaded.run_dir, video_dir)  # LOGGER=wandb: into the training's run
    out = sim_result(loaded.run_dir, sim, loaded.step)
    earlier = _earlier(out)  # read before the rollouts: a damaged file fails now, not after them
    plan = _plan(simulator, loaded, tasks, modes, episodes, corrupted_episodes, n_action_steps, max_steps,
                 _as_tuple(chunking), _as_tuple(inference_delay))
    if plan.unseen and console is not None:
        console.print(f"[yellow]warning: {len(plan.unseen)} task(s) never seen in the training data (their "
                      f"instruction is not one of the dataset's tasks): {', '.join(plan.unseen[:5])}")
    jobs = episode_jobs(plan)
    outcomes: dict[EpisodeJob, EpisodeOutcome] = {}
    wins: dict[tuple[int, str], list[int]] = {}  # (task, label) -> [successes, episodes] finished so far
    total = len(plan.tasks) * (sum(plan.episodes_for.values()) + len(plan.latency) * episodes)
    here = functools.partial(EpisodeRunner, simulator, plan, loaded.policy, loaded.encoder, seed, video_dir)
    there = functools.partial(_worker_runner, sim, loaded.policy_dir, loaded.device, loaded.settings, plan, seed,
                              video_dir)
    processes = processes or loaded.settings.eval.processes
    with make_progress("episodes", console=console, disable=not progress) as bar, \
            JobPool(processes, here if processes == 1 else there, lambda j: j.describe(plan, seed)) as pool:
        bar_task = bar.add_task(f"{sim} rollouts", total=total, info="")
        bar.advance(bar_task, total - len(jobs))  # oracle: nothing to roll out
        for job, outcome in pool.run(jobs, functools.partial(needed_episode, plan)):
            outcomes[job] = outcome
            count = wins.setdefault((job.task, job.label), [0, 0])
            count[0], count[1] = count[0] + outcome.success, count[1] + 1
            bar.update(bar_task, advance=1, info=f"{plan.tasks[job.task].name[:40]} {job.label}: {count[0]}/{count[1]}")
    per_task: dict[str, dict] = {}
    latency: dict[tuple[str, int], dict[str, dict]] = {}  # {(strategy, d): {task: cell}}
    for index, task in enumerate(plan.tasks):
        per_task[task.name], cells = _task_cells(plan, index, outcomes)
        for setting, cell in cells.items():
            latency.setdefault(setting, {})[task.name] = cell
    result = _aggregate(simulator, loaded, plan, episodes, per_task, earlier, latency)
    write_text_atomic(out, json.dumps(result, indent=2))
    if log is not None:
        log(result)
    return result, out


@dataclass
class _Loaded:
    """What the closed loop needs of a trained run (`_load`)."""

    run_dir: Path
    settings: Settings  # the run's, EVAL_SUITE replaced when asked
    step: int  # of the evaluated checkpoint
    policy: FPlusPolicy  # in eval mode on the evaluation device
    dataset: LeRobotDataset  # the training dataset (image sizes, task sentences)
    encoder: Any | None  # the world encoder of the online latents; None when the policy reads no world latents
    policy_dir: Path  # the checkpoint (or exported folder) `policy` was loaded from: what workers load
    device: str  # the policy's
    exported: bool = False  # an exported model folder (fplus export), not a run directory


def _load(run_dir: Path, step: int | None, suite: str | None, device: str | None,
          local: dict | None = None) -> _Loaded:
    """The run (fplus.rundir.load_run: its settings, its checkpoint `step`, default the latest valid one, refused
    when it was copied from another run; or an exported folder, fplus.deploy.loader.load_any), opened by
    fplus.deploy.loader.open_run (the training dataset, refused when its fingerprint changed; the policy on
    `device`, default EVAL_DEVICE), and the world encoder."""
    from fplus.deploy.loader import ExportedRun, load_any, open_run

    run = load_any(Path(run_dir), step, local)
    opened = open_run(run, device)
    settings = run.settings
    if suite is not None:
        settings = settings.model_copy(update={"eval": settings.eval.model_copy(update={"suite": suite})})
    return _Loaded(run.dir, settings, run.step, opened.policy, opened.dataset,
                   _world_encoder(settings, opened.policy, opened.device), run.policy_dir, opened.device,
                   isinstance(run, ExportedRun))


def _world_encoder(settings: Settings, policy: FPlusPolicy, device: str):
    """The encoder of the online world latents (the run's WORLD_* settings), None when the policy reads none."""
    from fplus.world.encoders import build_encoder

    if not policy.config.world_dim:
        return None
    world = settings.world
    return build_encoder(world.source, dino_model=world.dino_model, vjepa_model=world.vjepa_model,
                         pooling=world.pooling, temporal_window=world.temporal_window, device=device)


@dataclass
class _Plan:
    """What to roll out (`_plan`)."""

    tasks: list[SimTask]
    unseen: list[str]  # names of the tasks whose instruction is not one of the dataset's tasks
    modes: tuple[str, ...]  # the modes reported (only `none` when no memory reaches the actions)
    ordered: list[str]  # the modes rolled out, `none` first: its memories feed `shuffle`
    episodes_for: dict[str, int]  # rollouts per task of each mode of `ordered`
    cameras: tuple[str, ...]  # the observation keys the policy reads (main camera first)
    image_sizes: tuple[int, ...]  # render size of every camera of the simulator
    n_action_steps: int
    max_steps: int
    latency: list[tuple[str, int]] = field(default_factory=list)  # (strategy, d) rolled out under `none` besides
    sweep: bool = False  # whether a latency section is written (then with sync/0 from the `none` rollouts)


def _plan(simulator: type[Simulator], loaded: _Loaded, tasks: list[str] | None, modes: tuple[str, ...],
          episodes: int, corrupted_episodes: int | None, n_action_steps: int | None,
          max_steps: int | None, strategies: tuple[str, ...] = ("sync",), delays: tuple[int, ...] = (0,)) -> _Plan:
    """Check that the run fits the simulator (cameras, action and state sizes) and that its chunks fit every
    latency setting, then choose tasks, modes, episodes per mode, cameras, image sizes, actions per chunk, the
    episode length and the latency settings."""
    settings, policy, ds, sim = loaded.settings, loaded.policy, loaded.dataset, simulator.name
    keys = [settings.data.image_key] + ([settings.data.wrist_image_key] if settings.data.wrist_image_key else [])
    if len(keys) > len(simulator.cameras):
        raise ConfigError(f"the run reads {len(keys)} cameras ({', '.join(keys)}); {sim} renders "
                         f"{len(simulator.cameras)} ({', '.join(simulator.cameras)})")
    if policy.config.action_dim != simulator.action_dim:
        raise ConfigError(f"the run's actions have {policy.config.action_dim} dimensions, {sim} takes "
                         f"{simulator.action_dim}: this run was not trained on {sim} data")
    if policy.config.state_dim is not None and policy.config.state_dim != simulator.state_dim:
        raise ConfigError(f"the run's state has {policy.config.state_dim} dimensions, {sim} gives "
                         f"{simulator.state_dim}: this run was not trained on {sim} data")
    horizon = policy.config.model.action_horizon
    n_action_steps = n_action_steps or max(1, horizon // 2)
    settings_all = settings_grid(strategies, delays)
    for strategy, d in settings_all:
        check_timing(strategy, horizon, n_action_steps, d)
    if any(s == "rtc" for s, _ in settings_all) and not supports_inpainting(policy):
        raise ConfigError("rtc chunking needs a policy that inpaints a prefix (FPlusPolicy.predict(..., prefix=, "
                          "inference_delay=, execution_horizon=)); this fplus's policy has none: use sync or naive")
    sweep = settings_all != [("sync", 0)]
    image_sizes = tuple(int(ds.features[k]["shape"][0]) for k in keys)
    # every camera is rendered; LIBERO's wrist camera follows the main size when the run reads only one
    image_sizes = image_sizes + (image_sizes[0],) * (len(simulator.cameras) - len(image_sizes))
    chosen = simulator.resolve_tasks(tasks, list(ds.tasks), settings)
    unseen = [t.name for t in chosen if t.instruction not in set(ds.tasks)]
    if policy.injection is None:  # no memory reaches the actions: every mode would repeat `none`
        modes = ("none",)
    ordered = [m for m in ("none", *modes) if m in modes or m == "none" and ("shuffle" in modes or sweep)]
    ordered = list(dict.fromkeys(ordered))
    episodes_for = {m: episodes if m == "none" else min(episodes, corrupted_episodes or episodes) for m in ordered}
    return _Plan(tasks=chosen, unseen=unseen, modes=modes, ordered=ordered, episodes_for=episodes_for,
                 cameras=simulator.cameras[:len(keys)], image_sizes=image_sizes, n_action_steps=n_action_steps,
                 max_steps=max_steps or simulator.default_max_steps(settings),
                 latency=[x for x in settings_all if x != ("sync", 0)], sweep=sweep)


def _as_tuple(value) -> tuple:
    return (value,) if isinstance(value, (str, int, np.integer)) else tuple(value)


class EpisodeRunner:
    """Rolls `EpisodeJob`s of a plan out with `policy`, in one env at a time (DESIGN 7: the previous task's env is
    closed before the next one is made); episode 0 of each task and label is filmed into `video_dir` when given."""

    def __init__(self, simulator: type[Simulator], plan: _Plan, policy: FPlusPolicy, encoder, seed: int,
                 video_dir: Path | None):
        self.simulator, self.plan, self.policy, self.encoder = simulator, plan, policy, encoder
        self.seed, self.video_dir = seed, video_dir
        self._env: tuple[int, Simulator] | None = None  # (task, its env)

    def __call__(self, job: EpisodeJob, source: EpisodeOutcome | None) -> EpisodeOutcome:
        plan, task = self.plan, self.plan.tasks[job.task]
        if self._env is None or self._env[0] != job.task:
            self.close()
            self._env = job.task, self.simulator.make_env(task, plan.image_sizes, plan.max_steps)
        generator = torch.Generator().manual_seed(self.seed + job.index)  # corruption draws on the CPU
        record = [] if job.mode == "none" and job.standard else None
        frames = [] if self.video_dir is not None and job.index == 0 else None
        latents = None if self.encoder is None else OnlineLatents(self.encoder, self.policy.config.history)
        stats = ChunkingStats()
        success = rollout(self.policy, self._env[1], task.instruction, self.seed + job.index, job.mode,
                          plan.n_action_steps, latents, None if source is None else source.memory, generator, record,
                          frames, plan.cameras, job.delay, job.strategy, stats)
        if frames:
            _write_video(self.video_dir / f"{task.name}-{job.label}-ep{job.index}.mp4", frames)
        return EpisodeOutcome(success, stats, record)

    def close(self) -> None:
        if self._env is not None:
            self._env[1].close()
            self._env = None


def _worker_runner(sim: str, policy_dir: Path, device: str, settings: Settings, plan: _Plan, seed: int,
                   video_dir: Path | None) -> EpisodeRunner:
    """In a worker process (`fplus.eval.parallel`): the runner of the policy loaded from `policy_dir` (the
    checkpoint the parent verified and loaded) and its world encoder."""
    from fplus.sim.registry import get_simulator

    policy = FPlusPolicy.load(policy_dir, device=device).eval()
    return EpisodeRunner(get_simulator(sim), plan, policy, _world_encoder(settings, policy, device), seed, video_dir)


def _task_cells(plan: _Plan, task: int, outcomes: dict[EpisodeJob, EpisodeOutcome]
                ) -> tuple[dict[str, dict], dict[tuple[str, int], dict]]:
    """A task's results from its episodes' outcomes, added in episode order: ({mode: {"successes", "episodes",
    "rate", "ci95"}}, {(strategy, d): latency cell (module doc)}, with sync/0 from the `none` rollouts when
    `plan.sweep`)."""
    results: dict[str, dict] = {}
    latency: dict[tuple[str, int], dict] = {}
    for mode, strategy, delay, n in episode_groups(plan):
        standard = (strategy, delay) == ("sync", 0)
        if mode == "oracle":
            results[mode] = {"successes": None, "episodes": 0, "rate": None, "ci95": None,
                             "note": "the future of a live rollout is not observed"}
            continue
        episodes = [outcomes[EpisodeJob(task, mode, strategy, delay, e)] for e in range(n)]
        wins, stats = sum(o.success for o in episodes), ChunkingStats()
        for o in episodes:
            stats.merge(o.stats)
        lo, hi = wilson_interval(wins, n)
        cell = {"successes": wins, "episodes": n, "rate": wins / n, "ci95": [lo, hi]}
        if standard:
            results[mode] = cell
        if mode == "none" and (plan.sweep or not standard):
            latency[(strategy, delay)] = {**cell, "smoothness": stats.smoothness.to_json(), "steps": stats.steps,
                                          "idle_steps": stats.idle_steps}
    if "none" not in plan.modes:  # rolled out only to feed `shuffle` or the latency sweep
        results.pop("none", None)
    return results, latency


def _aggregate(simulator: type[Simulator], loaded: _Loaded, plan: _Plan, episodes: int,
               per_task: dict[str, dict], earlier: dict | None,
               latency: dict[tuple[str, int], dict[str, dict]] | None = None) -> dict:
    """The results file: what was run, per task and mode, and over all tasks (with the tasks and modes of an
    earlier evaluation of this checkpoint kept unless redone here), and the latency section when there is one
    (`latency`: {(strategy, d): {task: cell}}, merged the same way with the earlier file's)."""
    result = {"run": str(loaded.run_dir), "experiment": loaded.settings.train.experiment, "step": loaded.step,
              "simulator": simulator.name, "episodes_per_task": episodes,
              "episodes_per_mode": {m: plan.episodes_for[m] for m in plan.modes},
              "n_action_steps": plan.n_action_steps, "max_steps": plan.max_steps,
              "tasks": per_task, "overall": {}, **simulator.result_fields(loaded.settings)}
    same = earlier is not None and all(earlier.get(k) == result.get(k)
                                       for k in ("episodes_per_task", "n_action_steps", "max_steps", "suite"))
    if same:
        for task, per_mode in earlier["tasks"].items():
            result["tasks"][task] = {**per_mode, **result["tasks"].get(task, {})}
    result["overall"] = overall_rates(result["tasks"])
    section = latency_section(latency or {}, plan.n_action_steps,
                              earlier.get("latency") if same and isinstance(earlier.get("latency"), dict) else None)
    if section:
        result["latency"] = section
    return result


def latency_section(cells: dict[tuple[str, int], dict[str, dict]], execution_horizon: int,
                    earlier: dict | None = None) -> dict:
    """{strategy: {str(d): {"chunking", "inference_delay", "execution_horizon", "mode", "tasks", "overall"}}} from
    {(strategy, d): {task: cell}}, each entry's tasks merged over an earlier section's (new tasks win) and its
    `overall` pooled over its tasks (`pool_latency`); strategies in STRATEGIES order, delays ascending."""
    merged: dict[tuple[str, int], dict[str, dict]] = {}
    for strategy, by_delay in (earlier or {}).items():
        for delay, entry in by_delay.items():
            merged[(strategy, int(delay))] = dict(entry.get("tasks") or {})
    for setting, tasks in cells.items():
        merged[setting] = {**merged.get(setting, {}), **tasks}
    out: dict[str, dict] = {}
    for (strategy, delay) in sorted(merged, key=lambda x: (STRATEGIES.index(x[0]) if x[0] in STRATEGIES else 9,
                                                           x[0], x[1])):
        tasks = merged[(strategy, delay)]
        out.setdefault(strategy, {})[str(delay)] = {
            "chunking": strategy, "inference_delay": delay, "execution_horizon": execution_horizon, "mode": "none",
            "tasks": tasks, "overall": pool_latency(list(tasks.values()))}
    return out


def pool_latency(cells: list[dict]) -> dict:
    """One latency cell from several (tasks): successes, episodes, steps and idle steps added, the Wilson interval
    of the pooled rate, smoothness pooled over every transition."""
    wins = sum(c["successes"] for c in cells)
    n = sum(c["episodes"] for c in cells)
    smooth = Smoothness()
    for c in cells:
        smooth = smooth + Smoothness.from_json(c["smoothness"])
    return {"successes": wins, "episodes": n, "rate": wins / n if n else None,
            "ci95": list(wilson_interval(wins, n)) if n else None, "smoothness": smooth.to_json(),
            "steps": sum(c["steps"] for c in cells), "idle_steps": sum(c["idle_steps"] for c in cells)}


def _earlier(path: Path) -> dict | None:
    """An earlier closed-loop evaluation file of the same checkpoint and simulator (None when there is none)."""
    if not path.is_file():
        return None
    from fplus.io import read_json

    fix = "delete it (the evaluation writes it again) or restore it"
    data = read_json(path, "the earlier closed-loop evaluation", fix)
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
        raise ConfigError(f"{path} is not a closed-loop evaluation (no `tasks` object); {fix}")
    if "latency" in data:
        bad = _bad_latency_entry(data["latency"])
        if bad:
            raise ConfigError(f"{path}: its `latency` section is damaged ({bad}); {fix}")
    return data


def _bad_latency_entry(section) -> str | None:
    """What is wrong with a results file's latency section (the module doc's format), or None."""
    need = {"successes", "episodes", "smoothness", "steps", "idle_steps"}
    if not isinstance(section, dict):
        return "not an object"
    for strategy, by_delay in section.items():
        if not isinstance(by_delay, dict):
            return f"{strategy}: not an object"
        for delay, entry in by_delay.items():
            where = f"{strategy}/{delay}"
            if not str(delay).isdigit() or not isinstance(entry, dict) or not isinstance(entry.get("tasks"), dict):
                return f"{where}: not a delay with a `tasks` object"
            for task, cell in entry["tasks"].items():
                if not isinstance(cell, dict) or need - set(cell) or not isinstance(cell["smoothness"], dict):
                    return f"{where}, task {task}: a cell needs {', '.join(sorted(need))}"
    return None


def overall_rates(tasks: dict[str, dict]) -> dict[str, dict]:
    """Success over all tasks per mode (modes with a count in every task), with the Wilson interval."""
    modes = [m for m in MODES if all(m in r and r[m]["successes"] is not None for r in tasks.values())]
    out = {}
    for mode in modes:
        wins = sum(r[mode]["successes"] for r in tasks.values())
        n = sum(r[mode]["episodes"] for r in tasks.values())
        out[mode] = {"successes": wins, "episodes": n, "rate": wins / n, "ci95": list(wilson_interval(wins, n))}
    return out


def _write_video(path: Path, frames: list[np.ndarray]) -> None:
    from fplus.data.video import VideoEncoder

    array = np.stack(frames)
    encoder = VideoEncoder(path, fps=10, height=array.shape[1], width=array.shape[2])
    encoder.write(array)
    encoder.close()


def _episodes_text(result: dict) -> str:
    """ "5 episodes per task and mode", or "11 episodes per task under none, 3 under zero, ..." when they differ."""
    n = result["episodes_per_task"]
    per_mode = result.get("episodes_per_mode") or {}
    plural = "s" if n != 1 else ""
    others = {m: k for m, k in per_mode.items() if m != "none" and k != n and m != "oracle"}
    if not others:
        return f"{n} episode{plural} per task and mode"
    return f"{n} episode{plural} per task under none, " + ", ".join(f"{k} under {m}" for m, k in others.items())


def results_table(result: dict):
    """A Rich table: success rate [95% interval] per task (rows) and corruption mode (columns)."""
    from rich.table import Table

    modes = list(result["overall"]) or list(next(iter(result["tasks"].values())))
    table = Table(title=f"{result['run']}  {result['experiment'] or 'custom'}  step {result['step']}  "
                        f"{result['simulator']}{' ' + result['suite'] if result.get('suite') else ''}, "
                        f"{_episodes_text(result)}",
                  title_justify="left")
    table.add_column("task")
    for mode in modes:
        table.add_column(mode, justify="right")

    def cell(r: dict | None) -> str:
        if r is None or r["successes"] is None:
            return "n/a"
        return f"{r['rate']:.0%} [{r['ci95'][0]:.0%}, {r['ci95'][1]:.0%}] ({r['successes']}/{r['episodes']})"

    for task, per_mode in result["tasks"].items():
        table.add_row(task, *[cell(per_mode.get(m)) for m in modes])
    table.add_row("[bold]all", *[cell(result["overall"].get(m)) for m in modes])
    return table


def latency_table(result: dict):
    """A Rich table of the latency section (None without one): per strategy and delay, success [95% interval]
    over all tasks, the mean action change at chunk boundaries and within chunks, and idle steps per episode."""
    section = result.get("latency")
    if not section:
        return None
    from rich.table import Table

    table = Table(title=f"latency: execution horizon s = {result['n_action_steps']}, mode none, "
                        f"{result['episodes_per_task']} episodes per task (all tasks)", title_justify="left")
    for name in ("chunking", "delay d", "success", "|Δa| boundary", "|Δa| within", "idle steps/episode"):
        table.add_column(name, justify="left" if name == "chunking" else "right")

    def num(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4g}"

    for strategy, by_delay in section.items():
        for delay, entry in by_delay.items():
            o = entry["overall"]
            if o["rate"] is None:
                continue
            rate = f"{o['rate']:.0%} [{o['ci95'][0]:.0%}, {o['ci95'][1]:.0%}] ({o['successes']}/{o['episodes']})"
            table.add_row(strategy, delay, rate, num(o["smoothness"]["boundary"]), num(o["smoothness"]["within"]),
                          num(o["idle_steps"] / o["episodes"]))
    return table
