"""The policy behind the server: a trained run opened for inference, and the per-episode state it needs.

    runner = load_runner(run_dir, step, device, settings.serve)   # fplus.rundir.load_run + fplus.deploy.loader.open_run
    episode = runner.new_episode()                                # one per connection
    result = runner.infer(episode, observation)                   # {"actions": (H, A) float32 raw, ...}

Per observation, as the closed loop does (fplus.eval.closed_loop.rollout): the main camera frame enters the
episode's online world latents (`OnlineLatents`, when the policy reads world latents), the policy batch is built by
`observation_batch` (images, instruction, state), the policy's processor adds the prompt, the history window of the
latents becomes `z_hist`, and `policy.predict` gives the chunk (corruption `none`; with an action prefix, real-time
chunking: `prefix`, `inference_delay`, `execution_horizon`). A frame sent with `observe_only` only enters the
history. `reset` starts the episode again. A flow-head policy samples its chunk from noise: drawn from the episode's
own generator, seeded with EPISODE_SEED at the episode's start, so that an episode's replies depend only on its
own observations (not on other connections). Not thread-safe: the server calls it from one thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fplus import __version__
from fplus import batch as K
from fplus.deploy.chunking import supports_inpainting
from fplus.deploy.episode import OnlineLatents, observation_batch
from fplus.deploy.observation import Observation, ObservationSpec

if TYPE_CHECKING:
    from fplus.deploy.loader import ExportedRun, OpenedRun
    from fplus.settings import ServeSettings

EPISODE_SEED = 0


@dataclass
class Episode:
    """What one connection's episode carries between observations: the online world latents (None without a world
    memory), the number of frames seen and the generator of the flow head's noise."""

    latents: OnlineLatents | None
    generator: torch.Generator
    frames: int = 0
    _saved: tuple = field(default=(), repr=False)

    def save(self) -> None:
        """Remember the state, so that a failed observation leaves the episode as it was (`restore`)."""
        n = None if self.latents is None else len(self.latents.frames)
        self._saved = (self.latents, n, self.frames, self.generator, self.generator.get_state())

    def restore(self) -> None:
        self.latents, n, self.frames, self.generator, state = self._saved
        self.generator.set_state(state)
        if self.latents is not None:
            del self.latents.frames[n:], self.latents.latents[n:]


class PolicyRunner:
    """A run's policy ready to answer observations (`load_runner` builds it).

    Attributes: opened (fplus.deploy.loader.OpenedRun), encoder (the world encoder of the online latents, or None),
    spec (what an observation must hold), tasks (the training dataset's task sentences), supports_prefix (the
    policy's predict takes an action prefix for real-time chunking).
    """

    def __init__(self, opened: OpenedRun, encoder: Any | None, spec: ObservationSpec, tasks: list[str]):
        self.opened, self.encoder, self.spec, self.tasks = opened, encoder, spec, tasks
        self.policy = opened.policy
        self.supports_prefix = supports_inpainting(self.policy)

    def new_episode(self) -> Episode:
        latents = None if self.encoder is None else OnlineLatents(self.encoder, self.policy.config.history)
        return Episode(latents, torch.Generator().manual_seed(EPISODE_SEED))

    def metadata(self) -> dict[str, Any]:
        """What a client receives on connect (openpi: the policy's metadata, a map)."""
        run, config = self.opened.run, self.policy.config
        return {"server": "fplus", "fplus_version": __version__, "run": run.dir.name,
                "experiment": run.experiment.id, "step": run.step, "action_horizon": config.model.action_horizon,
                "action_dim": config.action_dim, "state_dim": config.state_dim,
                "world_memory": self.encoder is not None, "observation": self.spec.describe(),
                "action_prefix": self.supports_prefix, "tasks": list(self.tasks)}

    def infer(self, episode: Episode, obs: Observation) -> dict[str, Any]:
        """The reply to one checked observation: {"actions": (H, A) float32 raw, "episode_step": frames seen in
        this episode, "policy_timing": {"infer_ms"}} ({"episode_step"} alone for observe_only). On any error
        the episode is left as it was before this observation."""
        episode.save()
        try:
            if obs.reset:
                fresh = self.new_episode()
                episode.latents, episode.generator, episode.frames = fresh.latents, fresh.generator, 0
            if episode.latents is not None:
                episode.latents.add(obs.images[0])
            episode.frames += 1
            if obs.observe_only:
                return {"episode_step": episode.frames - 1}
            cameras = ("image", "wrist_image")[:len(obs.images)]
            raw = dict(zip(cameras, obs.images, strict=True))
            if obs.state is not None:
                raw["state"] = obs.state
            batch = self.policy.processor(observation_batch(raw, cameras, obs.prompt, obs.state is not None))
            if episode.latents is not None:
                batch[K.Z_HIST] = episode.latents.history_window()
            extra = {}
            if obs.prefix is not None:
                extra = {"prefix": torch.from_numpy(obs.prefix)[None], "inference_delay": obs.delay}
                if obs.horizon is not None:
                    extra["execution_horizon"] = obs.horizon
            start = time.perf_counter()
            prediction = self.policy.predict(batch, generator=episode.generator, **extra)
            actions = prediction.actions[0].float().cpu().numpy()
            predict_ms = (time.perf_counter() - start) * 1e3
        except BaseException:
            episode.restore()
            raise
        return {"actions": np.ascontiguousarray(actions, dtype=np.float32), "episode_step": episode.frames - 1,
                "policy_timing": {"infer_ms": predict_ms}}


def load_runner(run_dir: Path, step: int | None, device: str | None, serve: ServeSettings) -> PolicyRunner:
    """Open the run for serving: `fplus.rundir.load_run` (settings, the checkpoint `step`, default the newest valid
    one), `fplus.deploy.loader.open_run` (the training dataset, fingerprint-checked; the policy on `device`, default
    the run's EVAL_DEVICE), the world encoder of its online latents, and the observation layout: the run's cameras
    (main, then wrist when it has WRIST_IMAGE_KEY) at its dataset's frame size, its state when it has STATE_KEY.

    An exported folder (fplus export) is served without its dataset: the frame size and the tasks are the ones its
    fplus_export.json records, and the world encoder must be the one it names (same id and revision)."""
    from fplus.deploy.loader import ExportedRun, load_any, open_run
    from fplus.world.encoders import build_encoder

    run = load_any(Path(run_dir), step)
    exported = isinstance(run, ExportedRun)
    opened = open_run(run, device, dataset=not exported)
    data, world, config = run.settings.data, run.settings.world, opened.policy.config
    encoder = None
    if config.world_dim:
        encoder = build_encoder(world.source, dino_model=world.dino_model, vjepa_model=world.vjepa_model,
                                pooling=world.pooling, temporal_window=world.temporal_window, device=opened.device)
        if exported:
            _check_encoder(run, encoder)
    if exported:
        observation = run.export["observation"]
        image_shape, tasks = tuple(observation["image_shape"]), list(observation["tasks"])
    else:
        frame = opened.dataset.frame_at(opened.keys.image, 0)  # the frame size the run was trained on
        image_shape, tasks = tuple(int(n) for n in frame.shape), list(opened.dataset.tasks)
    image_keys = (serve.image_key,) + ((serve.wrist_image_key,) if data.wrist_image_key else ())
    spec = ObservationSpec(image_keys=image_keys, image_shape=image_shape,
                           state_key=serve.state_key if config.state_dim is not None else None,
                           state_dim=config.state_dim, prompt_key=serve.prompt_key, action_dim=config.action_dim,
                           horizon=config.model.action_horizon)
    return PolicyRunner(opened, encoder, spec, tasks)


def _check_encoder(run: ExportedRun, encoder: Any) -> None:
    """The online encoder of an exported world policy must be the one its latents were computed with."""
    from fplus.errors import CheckpointError

    recorded = run.export["world_encoder"]
    if recorded is None or (recorded["encoder_id"], recorded["revision"]) != (encoder.model_id, encoder.revision):
        got = f"{encoder.model_id!r} at revision {encoder.revision!r}"
        want = "none" if recorded is None else f"{recorded['encoder_id']!r} at revision {recorded['revision']!r}"
        raise CheckpointError(f"{run.dir}: the world encoder loaded here is {got}, the policy was trained on latents "
                              f"of {want} (fplus_export.json `world_encoder`); make that revision the one "
                              "loaded (hub cache or a local directory)")
