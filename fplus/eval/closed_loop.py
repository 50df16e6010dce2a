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
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fplus import batch as K
from fplus.errors import ConfigError
from fplus.io import write_text_atomic
from fplus.model.corruption import MODES
from fplus.model.policy import FPlusPolicy
from fplus.rundir import sim_result

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


class OnlineLatents:
    """World latents of a live rollout: z_t from the causal clip of the last m frames seen (repeat-padded)."""

    def __init__(self, encoder, history: int):
        self.encoder, self.history = encoder, history
        self.frames: list[np.ndarray] = []
        self.latents: list[torch.Tensor] = []

    def add(self, frame: np.ndarray) -> None:
        self.frames.append(frame)
        m = self.encoder.temporal_window
        idx = [max(0, len(self.frames) - m + i) for i in range(m)]
        clip = torch.from_numpy(np.stack([self.frames[i] for i in idx]))[None]  # (1, m, H, W, 3)
        # rounded to float16 as the cache stores latents: online and offline latents of a frame are identical
        self.latents.append(self.encoder.encode_frames(clip)[0].half().float())

    def history_window(self) -> torch.Tensor:
        """(1, T, D): z[t-T+1 .. t], the first latent repeated before the rollout started."""
        n = len(self.latents)
        idx = [max(0, n - self.history + i) for i in range(self.history)]
        return torch.stack([self.latents[i] for i in idx])[None]


def observation_batch(obs: dict, cameras: tuple[str, ...], instruction: str, use_state: bool) -> dict:
    """The policy batch of one observation: IMAGES (1, h, w, 3) for one camera, (1, C, h, w, 3) for C cameras."""
    frames = [obs[c] for c in cameras]
    images = frames[0] if len(frames) == 1 else np.stack(frames)
    batch = {K.IMAGES: torch.from_numpy(images)[None], K.INSTRUCTIONS: [instruction]}
    if use_state:
        batch[K.STATE] = torch.from_numpy(obs["state"])[None]
    return batch


def rollout(policy: FPlusPolicy, env, instruction: str, episode: int, mode: str, n_action_steps: int,
            latents: OnlineLatents | None, shuffle_source: list[torch.Tensor] | None, generator: torch.Generator,
            record: list[torch.Tensor] | None = None, frames_out: list[np.ndarray] | None = None,
            cameras: tuple[str, ...] = ("image",)) -> bool:
    """One episode; returns success.

    `env.reset(episode)` picks the initial layout. Every observed main-camera frame enters the online latents
    (the history spacing matches training's consecutive frames); a chunk is predicted every `n_action_steps`
    steps. `cameras` are the observation keys the policy reads (the run's image key, then its wrist key).
    `record` collects the Prophet's memory (1, K, D) of each chunk (for `shuffle` of other rollouts),
    `shuffle_source` is another rollout's record (injected instead of this rollout's prediction under `shuffle`).
    """
    obs = env.reset(episode)
    use_state = policy.config.state_dim is not None
    chunk_index = 0
    while True:
        if latents is not None:
            latents.add(obs["image"])
        if frames_out is not None:
            frames_out.append(obs["image"])
        batch = policy.processor(observation_batch(obs, cameras, instruction, use_state))  # + the prompt
        if latents is not None:
            batch[K.Z_HIST] = latents.history_window()
        memory = None
        if mode == "shuffle" and policy.injection is not None:
            memory = shuffle_source[min(chunk_index, len(shuffle_source) - 1)]
        prediction = policy.predict(batch, corruption="none" if mode == "shuffle" else mode, generator=generator,
                                    memory=memory)
        if record is not None and prediction.memory is not None:
            record.append(prediction.memory.cpu())
        chunk_index += 1
        actions = prediction.actions[0, :n_action_steps].float().cpu().numpy()
        for i, action in enumerate(actions):
            obs, success, done = env.step(action)
            if success:
                return True
            if done:
                return False
            if i < len(actions) - 1:  # frames between chunk predictions still enter the history
                if latents is not None:
                    latents.add(obs["image"])
                if frames_out is not None:
                    frames_out.append(obs["image"])


def evaluate_closed_loop(run_dir: Path, sim: str, tasks: list[str] | None, episodes: int,
                         modes: tuple[str, ...] = CLOSED_LOOP_MODES, n_action_steps: int | None = None,
                         max_steps: int | None = None, step: int | None = None, seed: int = 1000,
                         video_dir: Path | None = None, progress: bool = True, console=None,
                         suite: str | None = None, device: str | None = None,
                         corrupted_episodes: int | None = None) -> tuple[dict, Path]:
    """Roll the run's checkpoint out in `sim` and write RUN/eval/sim-<sim>-step-XXXXXX.json.

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
    """
    from fplus.progress import make_progress
    from fplus.sim.registry import get_simulator

    simulator = get_simulator(sim)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ConfigError(f"unknown corruption modes {bad}; valid: {', '.join(MODES)}")
    loaded = _load(Path(run_dir), step, suite, device)
    out = sim_result(loaded.run_dir, sim, loaded.step)
    earlier = _earlier(out)  # read before the rollouts: a damaged file fails now, not after them
    plan = _plan(simulator, loaded, tasks, modes, episodes, corrupted_episodes, n_action_steps, max_steps)
    if plan.unseen and console is not None:
        console.print(f"[yellow]warning: {len(plan.unseen)} task(s) never seen in the training data (their "
                      f"instruction is not one of the dataset's tasks): {', '.join(plan.unseen[:5])}")
    per_task: dict[str, dict] = {}
    with make_progress("episodes", console=console, disable=not progress) as bar:
        job = bar.add_task(f"{sim} rollouts", total=len(plan.tasks) * sum(plan.episodes_for.values()), info="")
        for task in plan.tasks:
            per_task[task.name] = _rollout_task(simulator, task, plan, loaded, seed, video_dir, bar, job)
    result = _aggregate(simulator, loaded, plan, episodes, per_task, earlier)
    write_text_atomic(out, json.dumps(result, indent=2))
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


def _load(run_dir: Path, step: int | None, suite: str | None, device: str | None) -> _Loaded:
    """The run (fplus.rundir.load_run: its settings, its checkpoint `step`, default the latest valid one, refused
    when it was copied from another run), opened by fplus.eval.loader.open_run (the training dataset, refused when
    its fingerprint changed; the policy on `device`, default EVAL_DEVICE), and the world encoder."""
    from fplus.eval.loader import open_run
    from fplus.rundir import load_run
    from fplus.world.encoders import build_encoder

    run = load_run(run_dir, step)
    opened = open_run(run, device)
    settings = run.settings
    if suite is not None:
        settings = settings.model_copy(update={"eval": settings.eval.model_copy(update={"suite": suite})})
    world = settings.world
    encoder = None
    if opened.policy.config.world_dim:
        encoder = build_encoder(world.source, dino_model=world.dino_model, vjepa_model=world.vjepa_model,
                                pooling=world.pooling, temporal_window=world.temporal_window, device=opened.device)
    return _Loaded(run.dir, settings, run.step, opened.policy, opened.dataset, encoder)


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


def _plan(simulator: type[Simulator], loaded: _Loaded, tasks: list[str] | None, modes: tuple[str, ...],
          episodes: int, corrupted_episodes: int | None, n_action_steps: int | None,
          max_steps: int | None) -> _Plan:
    """Check that the run fits the simulator (cameras, action and state sizes), then choose tasks, modes, episodes
    per mode, cameras, image sizes, actions per chunk and the episode length."""
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
    image_sizes = tuple(int(ds.features[k]["shape"][0]) for k in keys)
    # every camera is rendered; LIBERO's wrist camera follows the main size when the run reads only one
    image_sizes = image_sizes + (image_sizes[0],) * (len(simulator.cameras) - len(image_sizes))
    chosen = simulator.resolve_tasks(tasks, list(ds.tasks), settings)
    unseen = [t.name for t in chosen if t.instruction not in set(ds.tasks)]
    if policy.injection is None:  # no memory reaches the actions: every mode would repeat `none`
        modes = ("none",)
    ordered = [m for m in ("none", *modes) if m in modes or m == "none" and "shuffle" in modes]
    ordered = list(dict.fromkeys(ordered))
    episodes_for = {m: episodes if m == "none" else min(episodes, corrupted_episodes or episodes) for m in ordered}
    return _Plan(tasks=chosen, unseen=unseen, modes=modes, ordered=ordered, episodes_for=episodes_for,
                 cameras=simulator.cameras[:len(keys)], image_sizes=image_sizes,
                 n_action_steps=n_action_steps or max(1, policy.config.model.action_horizon // 2),
                 max_steps=max_steps or simulator.default_max_steps(settings))


def _rollout_task(simulator: type[Simulator], task: SimTask, plan: _Plan, loaded: _Loaded, seed: int,
                  video_dir: Path | None, bar, job) -> dict[str, dict]:
    """Every mode's episodes of one task in one env (creating one costs seconds; every episode resets it to its
    own layout): {mode: {"successes", "episodes", "rate", "ci95"}}; each episode advances `job` of `bar`."""
    policy = loaded.policy
    memories: list[list[torch.Tensor]] = []  # the `none` rollouts' memories, for `shuffle`
    results: dict[str, dict] = {}
    with simulator.make_env(task, plan.image_sizes, plan.max_steps) as env:
        for mode in plan.ordered:
            n = plan.episodes_for[mode]
            if mode == "oracle":
                results[mode] = {"successes": None, "episodes": 0, "rate": None, "ci95": None,
                                 "note": "the future of a live rollout is not observed"}
                bar.advance(job, n)
                continue
            generator = torch.Generator().manual_seed(seed)  # corruption draws on the CPU
            wins = 0
            for e in range(n):
                record = [] if mode == "none" else None
                frames = [] if video_dir is not None and e == 0 else None
                source = memories[(e + 1) % len(memories)] if mode == "shuffle" and memories else None
                if mode == "shuffle" and policy.injection is not None and (source is None or len(memories) < 2):
                    raise ConfigError("closed-loop shuffle needs at least 2 episodes per task")
                latents = None if loaded.encoder is None else OnlineLatents(loaded.encoder, policy.config.history)
                success = rollout(policy, env, task.instruction, seed + e, mode, plan.n_action_steps, latents,
                                  source, generator, record, frames, plan.cameras)
                wins += success
                if record is not None:
                    memories.append(record)
                if frames:
                    _write_video(video_dir / f"{task.name}-{mode}-ep{e}.mp4", frames)
                bar.update(job, advance=1, info=f"{task.name[:40]} {mode}: {wins}/{e + 1}")
            lo, hi = wilson_interval(wins, n)
            results[mode] = {"successes": wins, "episodes": n, "rate": wins / n, "ci95": [lo, hi]}
    if "none" not in plan.modes:  # rolled out only to feed `shuffle`
        results.pop("none", None)
    return results


def _aggregate(simulator: type[Simulator], loaded: _Loaded, plan: _Plan, episodes: int,
               per_task: dict[str, dict], earlier: dict | None) -> dict:
    """The results file: what was run, per task and mode, and over all tasks (with the tasks and modes of an
    earlier evaluation of this checkpoint kept unless redone here)."""
    result = {"run": str(loaded.run_dir), "experiment": loaded.settings.train.experiment, "step": loaded.step,
              "simulator": simulator.name, "episodes_per_task": episodes,
              "episodes_per_mode": {m: plan.episodes_for[m] for m in plan.modes},
              "n_action_steps": plan.n_action_steps, "max_steps": plan.max_steps,
              "tasks": per_task, "overall": {}, **simulator.result_fields(loaded.settings)}
    if earlier is not None:
        same = all(earlier.get(k) == result.get(k)
                   for k in ("episodes_per_task", "n_action_steps", "max_steps", "suite"))
        if same:
            for task, per_mode in earlier["tasks"].items():
                result["tasks"][task] = {**per_mode, **result["tasks"].get(task, {})}
    result["overall"] = overall_rates(result["tasks"])
    return result


def _earlier(path: Path) -> dict | None:
    """An earlier closed-loop evaluation file of the same checkpoint and simulator (None when there is none)."""
    if not path.is_file():
        return None
    from fplus.io import read_json

    fix = "delete it (the evaluation writes it again) or restore it"
    data = read_json(path, "the earlier closed-loop evaluation", fix)
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
        raise ConfigError(f"{path} is not a closed-loop evaluation (no `tasks` object); {fix}")
    return data


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
