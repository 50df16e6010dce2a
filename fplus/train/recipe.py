"""The one training loop (torchtune-style recipe: setup / train_step / validate / save), on accelerate.

Every experiment (E0-E4) runs through it; the experiment spec of the settings (`fplus.experiments.Experiment.of`)
decides which parts of the policy exist and what the run reads (latents, CoC labels). It writes a run directory as
`fplus.rundir` defines it (config.json, split.json, latent_stats.json, metrics.jsonl, checkpoints/, COMPLETE).

Exact resume: a checkpoint holds weights, optimiser, scheduler, epoch, steps done, position in the epoch and all
random states, and the data order of an epoch is a function of (seed, epoch), so a run killed at step k and
resumed ends with the same weights as an uninterrupted one.

Faults (DESIGN 12): a non-finite loss term or gradient stops training (NONFINITE=error: nothing of that step is
applied, the last checkpoint stays the newest, the run is not complete) or skips the batch (NONFINITE=skip: no
optimiser step, counted as `skipped_nonfinite`). SIGINT/SIGTERM finish the optimiser step in progress, save a
checkpoint and raise `TrainingInterrupted` (exit status 130/143); a second signal aborts at once
(`TrainingAborted`), the save in progress removing its temporary directory. A save that fails (disk full) removes
its partial checkpoint and names the file and the free space.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from fplus import checkpoint as ckpt
from fplus.data.lerobot import LeRobotDataset, keys_from_settings
from fplus.data.mixture import MixtureDataset, check_split, member_records, open_dataset, split_dataset
from fplus.data.split import Split
from fplus.errors import CheckpointError, ConfigError, FplusError
from fplus.experiments import Experiment
from fplus.io import write_text_atomic
from fplus.model.augment import ImageAugment
from fplus.model.config import PolicyConfig
from fplus.model.corruption import MODES
from fplus.model.policy import LOSS_WEIGHTS, FPlusPolicy
from fplus.rundir import COMPLETE, CONFIG, LATENT_STATS, METRICS, SPLIT, load_run
from fplus.settings import Settings, settings_to_flat
from fplus.train import distributed
from fplus.train.data import (
    Collate,
    EpochIndices,
    EpochSampler,
    PolicySamples,
    WeightedEpochSampler,
    default_workers,
    fits_in_ram,
    latent_stats,
)
from fplus.train.state import (
    TrainingAborted,
    TrainingInterrupted,
    TrainProgress,
    lr_lambda,
    p_oracle_at,
    rng_state,
    set_rng_state,
    truncate_metrics,
)

LOSS_TERMS = ("loss", *LOSS_WEIGHTS)
"""The loss terms of a train step's metrics (the total and each of FPlusPolicy.losses), checked for finiteness."""
NONFINITE_HINT = "Check the data (fplus data info) and the latents (fplus doctor), or set NONFINITE=skip"


def _fused_adamw(policy: torch.nn.Module) -> bool:
    """Whether torch's fused AdamW can step every trainable parameter (floating point, on CPU or CUDA)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


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
        self._signal: int | None = None  # the first SIGINT/SIGTERM received while training
        self._training = False  # signals only ask to stop once the steps have started
        self._stop = False  # every process agreed to stop after this step (the signal, reduced over processes)
        self._unigram: float | None = None  # val_l_text's trivial baseline, once known
        self._val_loader = None  # the validation loader, built at the first validation
        self._saved_step: int | None = None
        self.logger = None
        if resume:
            stored = load_run(self.run_dir, checkpoint=False).settings  # checked against the recorded policy
            if settings_to_flat(stored) != settings_to_flat(settings):
                changed = [k for k, v in settings_to_flat(settings).items() if settings_to_flat(stored)[k] != v]
                self._print(f"resuming with the run's own settings; ignoring current differences in "
                            f"{', '.join(changed)}", "yellow")
            settings = stored
        elif (self.run_dir / CONFIG).is_file():
            raise CheckpointError(f"{self.run_dir} already holds a run; pass --resume to continue it, or use another "
                             "RUN_NAME / OUTPUT_DIR")
        self.settings = settings
        self.experiment = Experiment.of(settings)

    def _print(self, text: str, style: str | None = None) -> None:
        """Print plain text (paths and messages are not Rich markup) on the console, if any."""
        if self.console is not None:
            from rich.markup import escape

            self.console.print(escape(text), style=style)

    # ----- setup ------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Accelerator, dataset, split, latents, CoC, policy, optimiser, scheduler, data; restore a checkpoint."""
        from accelerate.utils import DistributedDataParallelKwargs

        s = self.settings
        cuda = torch.cuda.is_available()
        self.accelerator = distributed.make_accelerator(  # FSDP2 on CPU too (fplus.train.distributed)
            mixed_precision="bf16" if (cuda and s.model.precision == "bf16") else "no",
            gradient_accumulation_steps=s.train.grad_accum, cpu=not cuda,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        acc = self.accelerator
        if acc.is_main_process:  # under the run's lock (train_run): no other writer's save is in progress
            stale = ckpt.remove_stale(self.run_dir)
            if stale:
                self._print(f"removed {len(stale)} partial checkpoint(s) left by an interrupted save in "
                            f"{ckpt.checkpoint_dir(self.run_dir)}: {', '.join(stale)}", "yellow")
        if s.data.dataset is None:
            raise ConfigError("no dataset: set DATASET (or use a profile that does)")
        self.keys = keys_from_settings(s.data)
        ds = open_dataset(s.data, self.keys)  # one dataset, or a weighted mixture (fplus.data.mixture)
        self.ds = ds
        if self.resume and isinstance(ds, MixtureDataset):  # the same datasets and weights draw the same samples
            load_run(self.run_dir, checkpoint=False).check_dataset(ds.fingerprint, s.data.dataset,
                                                                   member_records(ds), content=False)
        self.split = self._split(ds)
        latents = self._latents(ds)
        coc = self._coc()
        config = PolicyConfig.from_settings(
            s, action_dim=ds.features[self.keys.action]["shape"][0],
            state_dim=ds.features[self.keys.state]["shape"][0] if self.keys.state else None,
            world_dim=None if latents is None else latents.shape[1])
        torch.manual_seed(s.train.seed)
        # on the accelerator already: in the run's precision there (bf16 frozen weights, fplus.model.precision)
        policy = FPlusPolicy.build(config, ds.stats, self.keys.action, self.keys.state, device=acc.device)
        if latents is not None and config.world_dim:
            mean, std = latent_stats(latents, ds, self.split.train)
            policy.set_latent_stats(mean, std)
            if acc.is_main_process:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                write_text_atomic(self.run_dir / LATENT_STATS, json.dumps(
                    {"episodes": "train", "frames": int(sum(ds.episode(e).length for e in self.split.train)),
                     "mean": mean.tolist(), "std": std.tolist()}))
        self.policy_config = policy.config  # with the backbone's resolved revision

        preload = fits_in_ram(ds, self.keys, s.train.frame_cache_gb)
        window = dict(horizon=config.model.action_horizon, history=config.history, future=config.future,
                      latents=latents)
        self.train_set = PolicySamples(ds, self.keys, self.split.train, coc=coc, preload=preload, **window)
        self.val_set = PolicySamples(ds, self.keys, self.split.val, coc=coc, preload=preload, **window) \
            if self.split.val else None
        micro = s.train.batch_size
        per_process = EpochSampler(len(self.train_set), 0, rank=0, world=acc.num_processes).per_process()
        self.steps_per_epoch = per_process // (micro * s.train.grad_accum)
        if self.steps_per_epoch == 0:
            per_step = micro * s.train.grad_accum * acc.num_processes
            raise ConfigError(f"{len(self.train_set)} training samples are fewer than one optimiser step "
                             f"(BATCH_SIZE x GRAD_ACCUM x processes = {per_step})")
        self.total_steps = s.train.max_steps or s.train.max_epochs * self.steps_per_epoch

        groups = self._param_groups(policy)
        # fused AdamW: one kernel per group, and its step counters stay on the parameters' device (the default
        # for-each AdamW reads every parameter's step count back to the host at each step)
        optimizer = torch.optim.AdamW(groups, weight_decay=s.train.weight_decay, fused=_fused_adamw(policy))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(s.train.warmup_steps, self.total_steps, s.train.min_lr_ratio))
        self.model, self.optimizer = distributed.prepare(acc, policy, optimizer, micro, s.train.max_grad_norm)
        self.generator = torch.Generator().manual_seed(s.train.seed * 1000 + acc.process_index)
        self.progress = TrainProgress()
        self.logger = None
        if acc.is_main_process:
            self._write_config(ds)
            from fplus.train.loggers import MetricLogger

            self.logger = MetricLogger(s, self.run_dir)  # LOGGER (W&B: resumes the run's own W&B run)
        if self.resume:
            self._restore()

    def _split(self, ds: LeRobotDataset | MixtureDataset) -> Split:
        path = self.run_dir / SPLIT
        if path.is_file():
            split = Split.load(path)
            check_split(split, ds, path)
            return split
        split = split_dataset(ds, self.settings.data.val_fraction, self.settings.data.split_seed)  # per member
        if self.accelerator.is_main_process:
            split.save(path)
        return split

    def _latents(self, ds: LeRobotDataset | MixtureDataset) -> np.ndarray | None:
        w = self.settings.world
        if not self.experiment.needs_world:
            return None
        from fplus.world.cache import find_dataset_latents

        encoder = w.dino_model if w.source == "dino" else w.vjepa_model
        _, latents = find_dataset_latents(w.cache_dir, ds, self.keys.image, w.source, encoder, w.pooling,
                                          w.temporal_window)  # a mixture: each member's cache entry, concatenated
        return np.asarray(latents)

    def _sampler(self, epoch: int, start: int = 0) -> EpochSampler:
        """The training order of an epoch on this process, from sample `start` of its share (resume): a seeded
        permutation, or for a mixture draws that follow the weights (WeightedEpochSampler); both of (SEED, epoch)."""
        acc, seed = self.accelerator, self.settings.train.seed
        if isinstance(self.ds, MixtureDataset):
            return WeightedEpochSampler(self.ds.member_of_rows(self.train_set.rows), self.ds.weights, seed, epoch,
                                        start=start, rank=acc.process_index, world=acc.num_processes)
        return EpochSampler(len(self.train_set), seed, epoch, start=start, rank=acc.process_index,
                            world=acc.num_processes)

    def _coc(self) -> dict[int, str] | None:
        if not self.experiment.needs_coc:
            return None
        from fplus.data.coc import load_coc

        path = self.settings.coc.jsonl
        if path is None:
            raise ConfigError(f"experiment {self.experiment.id} trains a CoC loss but "
                             "COC_JSONL is not set; write labels with `fplus coc generate`")
        if isinstance(self.ds, MixtureDataset):
            raise ConfigError(f"experiment {self.experiment.id} trains a CoC loss, whose labels (COC_JSONL) name the "
                              "episodes of one dataset: train it on one dataset, not on a mixture")
        return load_coc(path, [*self.split.train, *self.split.val], max_tokens=self.settings.coc.max_tokens)

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

    def _write_config(self, ds: LeRobotDataset | MixtureDataset) -> None:
        from fplus import __version__

        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / CONFIG
        if path.is_file():
            return
        data = {"settings": settings_to_flat(self.settings), "policy": self.policy_config.to_json(),
                "dataset_fingerprint": ds.fingerprint, "fplus_version": __version__,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps}
        if isinstance(ds, MixtureDataset):
            data["dataset_members"] = ds.member_records()  # Run.check_dataset names the one that changed
        write_text_atomic(path, json.dumps(data, indent=2))

    # ----- train ------------------------------------------------------------------------------------------------

    def train_step(self, batches: list[dict]) -> dict[str, torch.Tensor | float | int | bool]:
        """One optimiser step over GRAD_ACCUM micro-batches. Returns the mean of each loss metric over them and
        `grad_norm`, the global L2 norm of the accumulated (all-reduced) gradient at the optimiser step, before
        clipping (what `clip_grad_norm_` returns; not averaged over the micro-batches), as 0-d tensors on the device,
        and `p_oracle`, `skipped_nonfinite` (and `skipped_step`) as Python numbers. `_after_step` reads the tensors
        only at logging steps.

        Host syncs: exactly one per step (the finiteness check of every loss term of every micro-batch and of the
        gradient norm; with several processes the all-reduce of those flags and of the stop signal). A non-finite
        value either raises an FplusError before anything of the step is applied (NONFINITE=error) or skips the
        optimiser step (NONFINITE=skip: gradients zeroed, counted in `skipped_nonfinite`).
        """
        acc, s = self.accelerator, self.settings.train
        p = p_oracle_at(self.progress.step, self.total_steps, s.p_oracle_start, s.p_oracle_end)
        per_batch: list[dict[str, torch.Tensor]] = []
        skipped = False
        grad_norm: torch.Tensor | None = None  # set at the last micro-batch (the optimiser step)
        self.model.train()
        for batch in batches:
            with acc.accumulate(self.model):
                with acc.autocast():
                    loss, metrics = self.model(batch, p_oracle=p, generator=self.generator)
                per_batch.append(metrics)
                acc.backward(loss)
                if acc.sync_gradients:
                    grad_norm = distributed.full_tensor(acc.clip_grad_norm_(self.model.parameters(), s.max_grad_norm))
                    if self._finite(per_batch, grad_norm):
                        self.optimizer.step()
                    else:
                        skipped = True  # NONFINITE=skip (NONFINITE=error raised)
                    self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.progress.step += 1
        self.progress.position += len(batches)
        out: dict[str, torch.Tensor | float | int | bool] = {
            k: torch.stack([m[k].float() for m in per_batch]).mean() for k in per_batch[0]}
        out["grad_norm"] = grad_norm.detach() if grad_norm is not None else math.nan
        out["p_oracle"] = p
        out["skipped_nonfinite"] = self.progress.skipped_nonfinite
        if skipped:
            out["skipped_step"] = True
        return out

    def _finite(self, per_batch: list[dict[str, torch.Tensor]], grad_norm: torch.Tensor) -> bool:
        """Whether every loss term of every micro-batch and the gradient norm are finite on every process (the
        step's one host sync); sets `_stop` (a SIGINT/SIGTERM on any process). Not finite: raises under
        NONFINITE=error, counts the skipped step under NONFINITE=skip and returns False."""
        acc = self.accelerator
        terms = [k for k in LOSS_TERMS if k in per_batch[0]]
        values = torch.stack([torch.stack([m[k].float() for k in terms]) for m in per_batch])  # (micro, terms)
        bad_here = (~torch.isfinite(values)).any(0).float()  # (terms,)
        norm_bad = (~torch.isfinite(grad_norm.float().reshape(1))).float().to(bad_here.device)
        elsewhere: list[str] = []
        if acc.num_processes == 1:
            self._stop = self._signal is not None
            flags = torch.cat([bad_here, norm_bad])
            if not bool(flags.any()):  # the step's host sync
                return True
        else:
            signals = torch.tensor([float(self._signal == signal.SIGINT), float(self._signal == signal.SIGTERM)],
                                   device=bad_here.device)
            reduced = acc.reduce(torch.cat([bad_here, norm_bad, signals]), reduction="sum").tolist()  # the sync
            *counts, norm_count, sigint, sigterm = reduced
            if self._signal is None and (sigint or sigterm):
                self._signal = signal.SIGINT if sigint else signal.SIGTERM
            self._stop = bool(sigint or sigterm)
            if not any(counts) and not norm_count:
                return True
            here = bad_here.tolist()
            elsewhere = [k for k, n, h in zip(terms, counts, here, strict=True) if n > h]
        self._nonfinite(per_batch, terms, float(grad_norm), elsewhere)  # raises under NONFINITE=error
        return False

    def _nonfinite(self, per_batch: list[dict[str, torch.Tensor]], terms: list[str], norm: float,
                   elsewhere: list[str]) -> None:
        """Raise (NONFINITE=error) or count and report a skipped batch (NONFINITE=skip), naming the non-finite
        term of the first micro-batch that has one (or the gradient, or another process)."""
        step = self.progress.step + 1  # the step being computed, as its metrics line will number it
        floats = [{k: float(v) for k, v in m.items()} for m in per_batch]
        bad = next(((names, m) for m in floats if (names := [k for k in terms if not math.isfinite(m[k])])), None)
        names, values = bad if bad is not None else ([], floats[-1])
        names = [k for k in names if k != "loss"] or names  # the total is non-finite because a term is
        shown = ", ".join(f"{k} {values[k]:.4g}" for k in LOSS_WEIGHTS if k in values)
        if names:
            what = f"{names[0]} is {values[names[0]]}" if len(names) == 1 else \
                f"{', '.join(names)} are non-finite"
        elif elsewhere:
            other = [k for k in elsewhere if k != "loss"] or elsewhere
            what = f"{', '.join(other)} {'is' if len(other) == 1 else 'are'} non-finite on another process"
        else:
            what = f"the gradient is non-finite (norm {norm})"
        if self.settings.train.nonfinite == "skip":
            self.progress.skipped_nonfinite += 1
            self._print(f"step {step}: {what} ({shown}): batch skipped (NONFINITE=skip; "
                        f"{self.progress.skipped_nonfinite} skipped so far)", "yellow")
            return
        kept = ckpt.list_checkpoints(self.run_dir)
        last = f"its last good checkpoint is step {int(kept[-1].name[len(ckpt.PREFIX):])}" if kept \
            else "it has no checkpoint yet"
        raise FplusError(f"step {step}: {what} ({shown}); the run is not complete; {last}. {NONFINITE_HINT}")

    def _loader(self, dataset: PolicySamples, sampler: EpochSampler) -> DataLoader:
        """Training batches of `sampler`'s epoch, augmented (AUGMENT) and with their prompts built in the worker
        processes (the image augmentation and the policy's processor run in `Collate`). One loader serves the whole
        run with the same workers (persistent): for a later epoch set `loader.sampler.epoch_sampler` and iterate it
        again. The samples carry their epoch to `Collate`, which keys the draws with it (whatever the workers)."""
        workers = default_workers(self.settings.train.num_workers, self.accelerator.num_processes)
        augment = ImageAugment.from_settings(self.settings.data, self.settings.train.seed)
        collate = Collate(self.accelerator.unwrap_model(self.model).processor, with_coc=True, augment=augment,
                          coc_fraction=self.settings.coc.fraction)
        return DataLoader(dataset, batch_size=self.settings.train.batch_size, sampler=EpochIndices(sampler),
                          collate_fn=collate, num_workers=workers, persistent_workers=workers > 0,
                          pin_memory=torch.cuda.is_available())

    def fit(self) -> TrainProgress:
        """Train until the last step (or `stop_after` steps of this invocation); validate each epoch; checkpoint.

        Raises:
            TrainingInterrupted: SIGINT/SIGTERM (under `signals()`): the step in progress was finished and saved.
            FplusError: a non-finite loss or gradient (NONFINITE=error), a checkpoint that cannot be written.
        """
        try:
            return self._fit()
        finally:
            self._val_loader = None  # its persistent workers end with it

    def _fit(self) -> TrainProgress:
        from fplus.progress import make_progress

        acc, s = self.accelerator, self.settings.train
        accum = s.grad_accum
        done_here = 0
        bar = make_progress("steps", console=self.console, disable=not (self.progress_bar and acc.is_main_process))
        self._training = True
        with bar:
            task = bar.add_task(f"train {s.experiment or 'custom'}", total=self.total_steps,
                                completed=self.progress.step, info="")
            loader = None  # one for the whole run (persistent workers): each epoch hands it that epoch's sampler
            while self.progress.step < self.total_steps:
                sampler = self._sampler(self.progress.epoch, start=self.progress.position * s.batch_size)
                if loader is None:
                    loader = self._loader(self.train_set, sampler)
                else:
                    loader.sampler.epoch_sampler = sampler
                micro_left = (self.steps_per_epoch * accum) - self.progress.position
                pending: list[dict] = []
                t0, samples = time.perf_counter(), 0
                for batch in self._batches(loader):
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
                    if self.progress.step >= self.total_steps or (self.stop_after and done_here >= self.stop_after) \
                            or self._stopping():
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
                if self._stopping() and self.progress.step < self.total_steps:
                    self._interrupted()
        if not self.progress.position == 0:  # the last step ended mid-epoch (MAX_STEPS): validate once more
            self._log({"kind": "val", **self.validate()})
        if self._saved_step != self.progress.step:
            self.save()
        if acc.is_main_process:
            write_text_atomic(self.run_dir / COMPLETE, json.dumps({"step": self.progress.step}))
        self.close()
        return self.progress

    def close(self) -> None:
        """Close the extra metrics logger (idempotent)."""
        if self.logger is not None:
            self.logger.close()
            self.logger = None

    def _batches(self, loader: DataLoader):
        """The loader's batches; once a stop is requested, a loader that fails (its workers got the terminal's
        Ctrl-C too) just ends the epoch: the steps done so far are saved."""
        it = iter(loader)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except Exception:
                if self._signal is not None:
                    self._stop = True
                    return
                raise
            yield batch

    # ----- signals ----------------------------------------------------------------------------------------------

    def _stopping(self) -> bool:
        """A signal asked to stop (one process: its flag; several: what all agreed on at the last step)."""
        return self._stop or (self.accelerator.num_processes == 1 and self._signal is not None)

    @contextmanager
    def signals(self):
        """SIGINT/SIGTERM handlers for the block (main thread only): during setup a signal aborts at once
        (nothing trained yet); while training the first one stops after the optimiser step in progress (and saves),
        a second one aborts at once. Both raise a TrainingInterrupted (exit 130 / 143)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, self._on_signal)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if not self._training:
            raise TrainingAborted(signum, f"{name} during setup: stopped {self.run_dir} before its first step "
                                  "(nothing trained in this invocation)")
        if self._signal is not None:
            last = self._last_checkpoint()
            raise TrainingAborted(signum, f"second {name}: aborted at once at step {self.progress.step}; the steps "
                                  f"after the last checkpoint are lost ({last})")
        self._signal = signum  # reported and acted on after the optimiser step in progress (not from here)

    def _last_checkpoint(self) -> str:
        kept = ckpt.list_checkpoints(self.run_dir)
        return f"last checkpoint {kept[-1]}" if kept else "no checkpoint yet"

    def _interrupted(self) -> None:
        """Save the step just finished and raise TrainingInterrupted."""
        name = signal.Signals(self._signal).name
        self._print(f"{name}: saving a checkpoint of step {self.progress.step} (a second {name} aborts at once)",
                    "yellow")
        path = self.save() if self._saved_step != self.progress.step else None
        path = path or ckpt.checkpoint_dir(self.run_dir) / f"{ckpt.PREFIX}{self.progress.step:06d}"
        self.close()
        raise TrainingInterrupted(self._signal, f"{name}: stopped {self.run_dir} at step {self.progress.step} of "
                                  f"{self.total_steps}, checkpoint saved ({path.name})")

    def _after_step(self, metrics: dict, bar, task) -> None:
        """Log (every LOG_EVERY steps and the last one: the device metrics are read then, averaged over the
        processes), update the progress bar (its loss and gate are those of the last logged step), save
        (SAVE_EVERY)."""
        s = self.settings.train
        step = self.progress.step
        if step % s.log_every == 0 or step == self.total_steps:
            metrics = self._read(metrics)
            lrs = {f"lr_{g['name']}": g["lr"] for g in self.optimizer.param_groups}
            self._log({"kind": "train", **metrics, **lrs})
            self._bar_info = f"loss {metrics['loss']:.4f}" + \
                (f"  gate {metrics['gate']:+.4f}" if "gate" in metrics else "")
        info = f"{getattr(self, '_bar_info', 'loss -')}  {metrics['samples_per_s']:.1f} samples/s"
        bar.update(task, completed=step, info=info)
        if s.save_every and step % s.save_every == 0 and step < self.total_steps:
            self.save()

    def _read(self, metrics: dict) -> dict[str, float | int | bool]:
        """The step's metrics as Python numbers: its tensors stacked, averaged over the processes (each holds the
        mean over its own samples; the gradient norm and the gate are the same on all) and read in one sync."""
        names = [k for k, v in metrics.items() if torch.is_tensor(v)]
        out = {k: v for k, v in metrics.items() if k not in names}
        if names:
            stacked = torch.stack([metrics[k].float().reshape(()) for k in names])
            if self.accelerator.num_processes > 1:
                stacked = self.accelerator.reduce(stacked.to(self.accelerator.device), reduction="mean")
            out.update(zip(names, stacked.tolist(), strict=True))
        return out

    # ----- validate ---------------------------------------------------------------------------------------------

    def validate(self) -> dict[str, float]:
        """Normalised action MSE on the validation episodes under every corruption mode (only `none` without an
        injected memory), the Prophet's world cosine beside its mean and copy-last baselines, the CoC text loss
        on every validation sample (val_l_text, CoC experiments) and the gate: one
        `fplus.train.validation.evaluate_modes` pass."""
        from fplus.train.validation import WORLD_METRICS, evaluate_modes, evaluation_loader

        policy = self.accelerator.unwrap_model(self.model)
        out: dict[str, float] = {"step": self.progress.step, "epoch": self.progress.epoch}
        if self.val_set is None:
            return out
        if self._val_loader is None:  # one for the run: its workers (NUM_WORKERS) serve every validation
            workers = default_workers(self.settings.train.num_workers, self.accelerator.num_processes)
            self._val_loader = evaluation_loader(policy, self.val_set, self.settings.train.batch_size, workers,
                                                 persistent=True)
        with self.accelerator.autocast():
            results = evaluate_modes(policy, self.val_set, MODES, self.settings.train.batch_size,
                                     self.settings.train.val_batches, loader=self._val_loader)
        for mode, r in results["modes"].items():
            out[f"val_mse_{mode}"] = r["mse_norm"]
        for key, value in (results["world"] or {}).items():
            out[WORLD_METRICS[key]] = value
        if results["text"] is not None:
            out["val_l_text"] = results["text"]["l_text"]
            out["val_l_text_unigram"] = self._text_baseline(policy)
        if policy.injection is not None:
            out["gate"] = policy.injection.gate_value
        return out

    def _text_baseline(self, policy) -> float:
        """val_l_text's trivial baseline (fplus.train.validation.unigram_text_baseline), computed once."""
        if self._unigram is None:
            from fplus.train.validation import unigram_text_baseline

            vocab = policy.vlm.get_output_embeddings().out_features
            self._unigram = unigram_text_baseline(policy.processor.builder.label_ids, vocab, self.train_set,
                                                  self.val_set)
        return self._unigram

    # ----- save / restore ---------------------------------------------------------------------------------------

    def save(self) -> Path | None:
        """Commit a checkpoint of the current step (main process writes; every process saves its RNG state).

        Under FSDP2 every process first takes part in gathering the full weights and optimiser state, which the
        main process writes as a one-process run would (fplus.train.distributed). A save that fails or is
        interrupted removes its temporary directory (the earlier checkpoints are not touched); a write failure
        (disk full) becomes an FplusError naming the file and the free space."""
        acc = self.accelerator
        acc.wait_for_everyone()
        step = self.progress.step
        tmp = ckpt.checkpoint_dir(self.run_dir) / f"{ckpt.TMP}{ckpt.PREFIX}{step:06d}"
        writing: Path | None = None
        final = None
        try:
            if acc.is_main_process:
                tmp = ckpt.begin(self.run_dir, step)
            acc.wait_for_everyone()
            writing = tmp / f"rng-{acc.process_index}.pt"
            torch.save(rng_state(self.generator), writing)
            weights = distributed.model_state(acc, self.model)  # FSDP2: gathered (every process), else None
            optimizer = distributed.optimizer_state(acc, self.model, self.optimizer)
            if acc.is_main_process:
                writing = tmp / "policy"
                acc.unwrap_model(self.model).save(writing, state=weights)
                writing = tmp / "trainer.pt"
                torch.save({"optimizer": optimizer, **distributed.optimizer_format(acc),
                            "scheduler": self.scheduler.state_dict(), "progress": asdict(self.progress)}, writing)
            acc.wait_for_everyone()
            if acc.is_main_process:
                writing = tmp / ckpt.MANIFEST
                final = ckpt.commit(self.run_dir, tmp, step, self.settings.train.keep_last)
        except BaseException as err:
            file = writing
            if writing is not None and writing.is_dir():
                file = ckpt.newest_file(writing) or writing
            if acc.is_main_process and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            problem = ckpt.save_error(err, self.run_dir, step, file) if isinstance(err, Exception) else None
            if problem is not None:
                raise problem from err
            raise
        acc.wait_for_everyone()
        self._saved_step = step
        return final

    def _restore(self) -> None:
        warn = lambda m: self._print(m, "yellow")  # noqa: E731
        path, unusable = None, []
        for candidate in reversed(ckpt.list_checkpoints(self.run_dir)):
            problem = ckpt.verify(candidate)
            if problem is None:
                path = candidate
                break
            warn(f"checkpoint {candidate.name} is unusable ({problem}); trying the previous one")
            unusable.append(candidate)
        acc = self.accelerator
        acc.wait_for_everyone()  # every process has looked before the main one renames
        if acc.is_main_process:
            for bad in unusable:  # out of the way: pruning must never keep them in place of the new checkpoints
                warn(f"moved the unusable checkpoint {bad.name} aside to {ckpt.set_aside(bad)} (delete it when "
                     "you no longer need it)")
        if path is None:
            dropped = truncate_metrics(self.run_dir / METRICS, -1) if acc.is_main_process else 0
            self._print("no usable checkpoint: starting from step 0"
                        + (f"; dropped the {dropped} metric line(s) of the earlier attempt from {METRICS}"
                           if dropped else ""))
            return
        # the run's policy config as config.json holds it (JSON: tuples are lists): a checkpoint copied from
        # another run (an E0 checkpoint into an E2 run) is refused, not trained on as this experiment
        ckpt.check_policy_config(path, {"policy": self.policy_config.to_json()}, self.run_dir)
        saved_by = len(list(path.glob("rng-*.pt")))  # each process saves its random state
        if saved_by != acc.num_processes:
            raise CheckpointError(f"{path} was written by {saved_by} process(es) and this run has "
                                  f"{acc.num_processes}; resume with the same number of processes")
        distributed.load_weights(acc, self.model, path / "policy")  # FSDP2: every process keeps its shards
        state = torch.load(path / "trainer.pt", weights_only=False)
        distributed.load_optimizer(acc, self.model, self.optimizer, state, path)
        self.scheduler.load_state_dict(state["scheduler"])
        self.progress = TrainProgress(**state["progress"])
        set_rng_state(torch.load(path / f"rng-{acc.process_index}.pt", weights_only=False), self.generator)
        self._saved_step = self.progress.step
        if acc.is_main_process:
            dropped = truncate_metrics(self.run_dir / METRICS, self.progress.step)
            if dropped:
                self._print(f"dropped {dropped} metric line(s) after step {self.progress.step} from {METRICS} "
                            "(they are written again)")
        self._print(f"resumed {self.run_dir} at step {self.progress.step} (epoch {self.progress.epoch})")

    def _log(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {"step": self.progress.step, "epoch": self.progress.epoch, **record}
        # JSON has no NaN: a non-finite number (of a skipped step) is written as null
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        path = self.run_dir / METRICS
        try:
            with path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            raise FplusError(f"cannot append to {path}: {err.strerror or err}; free space or fix the permissions, "
                             "then resume the run (--resume)") from err
        if self.logger is not None:
            self.logger.log({k: v for k, v in record.items() if v is not None})
