"""The one training loop (torchtune-style recipe: setup / train_step / validate / save), on accelerate.

Every experiment (E0-E4) runs through it; the settings decide which parts of the policy exist. A run directory:

    RUN/config.json      resolved settings (flat names), policy config, dataset fingerprint: resume and eval
                         read them from here, never from the current environment
    RUN/split.json       train/validation episodes
    RUN/latent_stats.json  per-dimension mean and std of the world latents over the training split (the policy
                         standardises latents with them; they are also in every checkpoint's policy weights)
    RUN/metrics.jsonl    one JSON line per log step (every loss term, gate, cos, lr, samples/s, p_oracle) and per
                         validation (action MSE under each corruption mode, gate)
    RUN/checkpoints/     atomic, verified checkpoints (fplus.train.checkpoint), the newest KEEP_LAST kept
    RUN/COMPLETE         written when the last step's checkpoint is committed

Exact resume: a checkpoint holds weights, optimiser, scheduler, epoch, steps done, position in the epoch and all
random states, and the data order of an epoch is a function of (seed, epoch), so a run killed at step k and
resumed ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from fplus.data.lerobot import LeRobotDataset, keys_from_settings
from fplus.data.split import Split, split_episodes
from fplus.errors import FplusError
from fplus.io import write_text_atomic
from fplus.model.corruption import MODES
from fplus.model.policy import FPlusPolicy, PolicyConfig
from fplus.settings import Settings, load_settings, settings_to_flat
from fplus.train import checkpoint as ckpt
from fplus.train.data import EpochSampler, PolicySamples, collate

CONFIG = "config.json"
SPLIT = "split.json"
METRICS = "metrics.jsonl"
COMPLETE = "COMPLETE"
LATENT_STATS = "latent_stats.json"


def latent_stats(latents: np.ndarray, ds: LeRobotDataset, episodes) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (D,) float32 of the raw world latents (N, D) over the frames of `episodes`
    (the training split): the standardisation every path applies (DESIGN 4). Accumulated in float64."""
    total = sq = None
    n = 0
    for e in episodes:
        ep = ds.episode(e)
        z = np.asarray(latents[ep.start:ep.stop], dtype=np.float64)
        total = z.sum(0) if total is None else total + z.sum(0)
        sq = (z * z).sum(0) if sq is None else sq + (z * z).sum(0)
        n += len(z)
    if not n:
        raise FplusError("no training frames to compute the world-latent statistics from")
    mean = total / n
    std = np.sqrt(np.maximum(sq / n - mean * mean, 0.0) * n / max(n - 1, 1))
    return torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(std.astype(np.float32))


def settings_from_run(run_dir: Path) -> Settings:
    """The settings a run was started with (from its config.json)."""
    path = run_dir / CONFIG
    if not path.is_file():
        raise FplusError(f"{run_dir} is not a run directory ({CONFIG} missing)")
    flat = json.loads(path.read_text())["settings"]
    return load_settings(None, {k: v for k, v in flat.items() if v is not None}, environ={}, dotenv=None)


def is_complete(run_dir: Path) -> bool:
    return (run_dir / COMPLETE).is_file()


@dataclass
class TrainProgress:
    """Where training stands: optimiser steps done, current epoch, micro-batches of this epoch consumed."""

    step: int = 0
    epoch: int = 0
    position: int = 0


def p_oracle_at(step: int, total: int, start: float, end: float) -> float:
    """Scheduled sampling: linear from `start` at step 0 to `end` at the last step."""
    return start + (end - start) * min(1.0, step / max(1, total - 1))


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warm-up to 1, then cosine decay to `min_ratio` at `total` steps."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


class TrainRecipe:
    """Train one experiment into `run_dir`.

    Args:
        settings: the resolved settings (ignored on resume: the run's config.json is used).
        run_dir: the run directory. resume: continue from the newest valid checkpoint.
        stop_after: stop (as if killed) after this many steps in this invocation, for tests and debugging.
    """

    def __init__(self, settings: Settings, run_dir: Path, resume: bool = False, stop_after: int | None = None,
                 console=None, progress_bar: bool = True):
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.stop_after = stop_after
        self.console = console
        self.progress_bar = progress_bar
        if resume:
            stored = settings_from_run(self.run_dir)
            if settings_to_flat(stored) != settings_to_flat(settings):
                changed = [k for k, v in settings_to_flat(settings).items() if settings_to_flat(stored)[k] != v]
                self._print(f"[yellow]resuming with the run's own settings; ignoring current differences in "
                            f"{', '.join(changed)}")
            settings = stored
        elif (self.run_dir / CONFIG).is_file():
            raise FplusError(f"{self.run_dir} already holds a run; pass --resume to continue it, or use another "
                             "RUN_NAME / OUTPUT_DIR")
        self.settings = settings

    def _print(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text)

    # ----- setup ------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Accelerator, dataset, split, latents, CoC, policy, optimiser, scheduler, data; restore a checkpoint."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        s = self.settings
        cuda = torch.cuda.is_available()
        self.accelerator = Accelerator(
            mixed_precision="bf16" if (cuda and s.model.precision == "bf16") else "no",
            gradient_accumulation_steps=s.train.grad_accum, cpu=not cuda,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        acc = self.accelerator
        if s.data.dataset is None:
            raise FplusError("no dataset: set DATASET (or use a profile that does)")
        self.keys = keys_from_settings(s.data)
        ds = LeRobotDataset.open(s.data.dataset, self.keys, revision=s.data.revision)
        self.ds = ds
        self.split = self._split(ds)
        latents = self._latents(ds)
        coc = self._coc()
        config = PolicyConfig.from_settings(
            s, action_dim=ds.features[self.keys.action]["shape"][0],
            state_dim=ds.features[self.keys.state]["shape"][0] if self.keys.state else None,
            world_dim=None if latents is None else latents.shape[1])
        torch.manual_seed(s.train.seed)
        policy = FPlusPolicy.build(config, ds.stats, self.keys.action, self.keys.state)
        if latents is not None and config.world_dim:
            mean, std = latent_stats(latents, ds, self.split.train)
            policy.set_latent_stats(mean, std)
            if acc.is_main_process:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                write_text_atomic(self.run_dir / LATENT_STATS, json.dumps(
                    {"episodes": "train", "frames": int(sum(ds.episode(e).length for e in self.split.train)),
                     "mean": mean.tolist(), "std": std.tolist()}))
        self.policy_config = config

        preload = _fits(ds, self.keys, s.train.frame_cache_gb)
        window = dict(horizon=config.action_horizon, history=config.history, future=config.future, latents=latents)
        self.train_set = PolicySamples(ds, self.keys, self.split.train, coc=coc, preload=preload, **window)
        self.val_set = PolicySamples(ds, self.keys, self.split.val, coc=coc, preload=preload, **window) \
            if self.split.val else None
        micro = s.train.batch_size
        per_process = EpochSampler(len(self.train_set), 0, rank=0, world=acc.num_processes).per_process()
        self.steps_per_epoch = per_process // (micro * s.train.grad_accum)
        if self.steps_per_epoch == 0:
            per_step = micro * s.train.grad_accum * acc.num_processes
            raise FplusError(f"{len(self.train_set)} training samples are fewer than one optimiser step "
                             f"(BATCH_SIZE x GRAD_ACCUM x processes = {per_step})")
        self.total_steps = s.train.max_steps or s.train.max_epochs * self.steps_per_epoch

        groups = self._param_groups(policy)
        optimizer = torch.optim.AdamW(groups, weight_decay=s.train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(s.train.warmup_steps, self.total_steps, s.train.min_lr_ratio))
        self.model, self.optimizer = acc.prepare(policy, optimizer)
        self.generator = torch.Generator().manual_seed(s.train.seed * 1000 + acc.process_index)
        self.progress = TrainProgress()
        self.logger = None
        if acc.is_main_process:
            self._write_config(ds)
            from fplus.train.loggers import MetricLogger

            self.logger = MetricLogger(s.train.logger, self.run_dir, self.run_dir.name, settings_to_flat(s))
        if self.resume:
            self._restore()

    def _split(self, ds: LeRobotDataset) -> Split:
        path = self.run_dir / SPLIT
        if path.is_file():
            return Split.load(path)
        split = split_episodes([e.index for e in ds.episodes], self.settings.data.val_fraction,
                               self.settings.data.split_seed)
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            split.save(path)
        return split

    def _latents(self, ds: LeRobotDataset) -> np.ndarray | None:
        m, w = self.settings.model, self.settings.world
        if not (m.prophet or m.flare_align):
            return None
        from fplus.world.cache import find_latents

        encoder = w.dino_model if w.source == "dino" else w.vjepa_model
        _, latents = find_latents(w.cache_dir, ds, self.keys.image, w.source, encoder, w.pooling, w.temporal_window)
        return np.asarray(latents)

    def _coc(self) -> dict[int, str] | None:
        if not self.settings.model.coc:
            return None
        from fplus.data.coc import load_coc

        path = self.settings.coc.jsonl
        if path is None:
            raise FplusError(f"experiment {self.settings.train.experiment or 'custom'} trains a CoC loss but "
                             "COC_JSONL is not set; write labels with `fplus coc generate`")
        return load_coc(path, [*self.split.train, *self.split.val])

    def _param_groups(self, policy: FPlusPolicy) -> list[dict]:
        t = self.settings.train
        backbone, prophet, heads = [], [], []
        for name, p in policy.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("vlm."):
                backbone.append(p)
            elif name.startswith("prophet."):  # the Prophet's context projection included
                prophet.append(p)
            else:
                heads.append(p)
        groups = [("backbone", backbone, t.lr_backbone), ("heads", heads, t.lr_heads),
                  ("prophet", prophet, t.lr_prophet)]
        return [{"name": n, "params": ps, "lr": lr} for n, ps, lr in groups if ps]

    def _write_config(self, ds: LeRobotDataset) -> None:
        from fplus import __version__

        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / CONFIG
        if path.is_file():
            return
        data = {"settings": settings_to_flat(self.settings), "policy": asdict(self.policy_config),
                "dataset_fingerprint": ds.fingerprint, "fplus_version": __version__,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps}
        write_text_atomic(path, json.dumps(data, indent=2))

    # ----- train ------------------------------------------------------------------------------------------------

    def train_step(self, batches: list[dict]) -> dict[str, float]:
        """One optimiser step over GRAD_ACCUM micro-batches; returns the mean of each metric."""
        acc, s = self.accelerator, self.settings.train
        p = p_oracle_at(self.progress.step, self.total_steps, s.p_oracle_start, s.p_oracle_end)
        sums: dict[str, float] = {}
        self.model.train()
        for batch in batches:
            with acc.accumulate(self.model):
                with acc.autocast():
                    loss, metrics = self.model(batch, p_oracle=p, generator=self.generator)
                acc.backward(loss)
                if acc.sync_gradients:
                    metrics["grad_norm"] = float(acc.clip_grad_norm_(self.model.parameters(), s.max_grad_norm))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
        self.scheduler.step()
        self.progress.step += 1
        self.progress.position += len(batches)
        out = {k: v / len(batches) for k, v in sums.items()}
        out["p_oracle"] = p
        return out

    def _loader(self, dataset: PolicySamples, sampler) -> DataLoader:
        workers = self.settings.train.num_workers
        return DataLoader(dataset, batch_size=self.settings.train.batch_size, sampler=sampler, collate_fn=collate,
                          num_workers=workers, persistent_workers=False, pin_memory=torch.cuda.is_available())

    def fit(self) -> TrainProgress:
        """Train until the last step (or `stop_after` steps of this invocation); validate each epoch; checkpoint."""
        from fplus.progress import make_progress

        acc, s = self.accelerator, self.settings.train
        accum = s.grad_accum
        done_here = 0
        bar = make_progress("steps", console=self.console, disable=not (self.progress_bar and acc.is_main_process))
        with bar:
            task = bar.add_task(f"train {s.experiment or 'custom'}", total=self.total_steps,
                                completed=self.progress.step, info="")
            while self.progress.step < self.total_steps:
                sampler = EpochSampler(len(self.train_set), s.seed, self.progress.epoch,
                                       start=self.progress.position * s.batch_size,
                                       rank=acc.process_index, world=acc.num_processes)
                micro_left = (self.steps_per_epoch * accum) - self.progress.position
                pending: list[dict] = []
                t0, samples = time.perf_counter(), 0
                for batch in self._loader(self.train_set, sampler):
                    if micro_left <= 0:
                        break
                    pending.append(batch)
                    micro_left -= 1
                    if len(pending) < accum:
                        continue
                    metrics = self.train_step(pending)
                    samples += sum(len(b["index"]) for b in pending) * acc.num_processes
                    pending = []
                    done_here += 1
                    metrics["samples_per_s"] = samples / max(time.perf_counter() - t0, 1e-9)
                    self._after_step(metrics, bar, task)
                    if s.val_every and self.progress.step % s.val_every == 0 and \
                            self.progress.step < self.total_steps:
                        self._log({"kind": "val", **self.validate()})
                    if self.progress.step >= self.total_steps or (self.stop_after and done_here >= self.stop_after):
                        break
                if self.stop_after and done_here >= self.stop_after and self.progress.step < self.total_steps:
                    return self.progress
                if self.progress.position >= self.steps_per_epoch * accum:
                    self.progress.epoch += 1
                    self.progress.position = 0
                    if s.val_every is None or self.progress.step >= self.total_steps:
                        self._log({"kind": "val", **self.validate()})
                    if s.save_every is None and self.progress.step < self.total_steps:
                        self.save()
        if not self.progress.position == 0:  # the last step ended mid-epoch (MAX_STEPS): validate once more
            self._log({"kind": "val", **self.validate()})
        self.save()
        if acc.is_main_process:
            (self.run_dir / COMPLETE).write_text(json.dumps({"step": self.progress.step}))
            if self.logger is not None:
                self.logger.close()
        return self.progress

    def _after_step(self, metrics: dict[str, float], bar, task) -> None:
        s = self.settings.train
        step = self.progress.step
        if step % s.log_every == 0 or step == self.total_steps:
            lrs = {f"lr_{g['name']}": g["lr"] for g in self.optimizer.param_groups}
            self._log({"kind": "train", **metrics, **lrs})
        info = f"loss {metrics['loss']:.4f}"
        if "gate" in metrics:
            info += f"  gate {metrics['gate']:+.4f}"
        info += f"  {metrics['samples_per_s']:.1f} samples/s"
        bar.update(task, completed=step, info=info)
        if s.save_every and step % s.save_every == 0 and step < self.total_steps:
            self.save()

    # ----- validate ---------------------------------------------------------------------------------------------

    def validate(self) -> dict[str, float]:
        """Normalised action MSE on the validation episodes under every corruption mode (only `none` without an
        injected memory), the Prophet's world cosine beside its mean and copy-last baselines, and the gate: one
        `fplus.eval.offline.evaluate_modes` pass."""
        from fplus.eval.offline import WORLD_METRICS, evaluate_modes

        policy = self.accelerator.unwrap_model(self.model)
        out: dict[str, float] = {"step": self.progress.step, "epoch": self.progress.epoch}
        if self.val_set is None:
            return out
        with self.accelerator.autocast():
            results = evaluate_modes(policy, self.val_set, MODES, self.settings.train.batch_size,
                                     self.settings.train.val_batches)
        for mode, r in results["modes"].items():
            out[f"val_mse_{mode}"] = r["mse_norm"]
        for key, value in (results["world"] or {}).items():
            out[WORLD_METRICS[key]] = value
        if policy.injection is not None:
            out["gate"] = policy.injection.gate_value
        return out

    # ----- save / restore ---------------------------------------------------------------------------------------

    def save(self) -> Path | None:
        """Commit a checkpoint of the current step (main process writes; every process saves its RNG state)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        tmp = ckpt.checkpoint_dir(self.run_dir) / f".tmp-{ckpt.PREFIX}{self.progress.step:06d}"
        if acc.is_main_process:
            tmp = ckpt.begin(self.run_dir, self.progress.step)
        acc.wait_for_everyone()
        torch.save(_rng_state(self.generator), tmp / f"rng-{acc.process_index}.pt")
        final = None
        if acc.is_main_process:
            acc.unwrap_model(self.model).save(tmp / "policy")
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "progress": asdict(self.progress)}, tmp / "trainer.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            final = ckpt.commit(self.run_dir, tmp, self.progress.step, self.settings.train.keep_last)
        acc.wait_for_everyone()
        return final

    def _restore(self) -> None:
        path = ckpt.latest_valid(self.run_dir, warn=lambda m: self._print(f"[yellow]{m}"))
        if path is None:
            self._print("no usable checkpoint: starting from step 0")
            return
        acc = self.accelerator
        acc.unwrap_model(self.model).load_weights(path / "policy")
        state = torch.load(path / "trainer.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.progress = TrainProgress(**state["progress"])
        rng = path / f"rng-{acc.process_index}.pt"
        if not rng.is_file():
            raise FplusError(f"{path} was written by fewer processes; resume with the same number of processes")
        _set_rng_state(torch.load(rng, weights_only=False), self.generator)
        if acc.is_main_process:
            _truncate_metrics(self.run_dir / METRICS, self.progress.step)
        self._print(f"resumed {self.run_dir} at step {self.progress.step} (epoch {self.progress.epoch})")

    def _log(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {"step": self.progress.step, "epoch": self.progress.epoch, **record}
        with (self.run_dir / METRICS).open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.logger is not None:
            self.logger.log(record)


def _fits(ds: LeRobotDataset, keys, budget_gb: float) -> bool:
    from fplus.train.data import FrameStore

    cameras = [keys.image] + ([keys.wrist_image] if keys.wrist_image else [])
    need = sum(FrameStore.estimate_bytes(ds, k, [e.index for e in ds.episodes]) for k in cameras)
    return need <= budget_gb * 2**30


def _rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after `step` (they will be written again by the resumed run)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))
