"""The one evaluation loop over a dataset: action error under each corruption of the future memory, and the world
cosines beside their trivial baselines. The training recipe's validation and `fplus eval` (fplus.eval.offline) both
call `evaluate_modes`.

Per batch it runs the backbone once and applies every corruption mode to the memory only (the ACT states do not
depend on it). Per mode it reports the masked MSE of the predicted action chunks in normalised units (the
training loss's units) and in raw units (overall and per action dimension); a flow head samples its chunks from
noise drawn from a generator seeded by SEED (one noise per batch, the same for every mode), so the numbers repeat
from one evaluation to the next. With a Prophet it also reports the world cosine cos(z_pred, z_future) over valid
future steps, next to two trivial baselines: always predicting the training mean, and copy-last (z_t repeated); in
the standardised space the loss uses and in the raw encoder space.
A Prophet that does not beat copy-last has learnt nothing the present does not already give. A CoC policy's
text loss on every validation sample's CoC text has its trivial baseline too (`unigram_text_baseline`).

Samples are visited in a fixed seeded random order, so every batch mixes episodes: `shuffle` gives each sample
the memory of a sample from another episode of the same batch (a batch where one episode holds more than half of
the samples leaves the surplus out of `shuffle`; `samples` counts what each mode used). Prompts are built by the
policy's processor in the loader's collate function.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from fplus import batch as K
from fplus.errors import ConfigError, DataError
from fplus.model.corruption import MODES, shuffle_donors
from fplus.model.policy import FPlusPolicy
from fplus.model.prophet import world_cosine_sums
from fplus.train.data import Collate, EpochSampler, PolicySamples

SEED = 12345  # sample order, random and shuffle corruptions, flow noise: every evaluation draws the same
WORLD_METRICS = {"prophet": "val_cos_world", "mean": "val_cos_world_mean", "copy": "val_cos_world_copy",
                 "prophet_raw": "val_cos_world_raw", "mean_raw": "val_cos_world_mean_raw",
                 "copy_raw": "val_cos_world_copy_raw", "align": "val_cos_align"}
"""Keys of an evaluation's `world` cosines -> the names of the validation metrics (metrics.jsonl)."""


def unigram_text_baseline(label_ids: Callable[[str], list[int]], vocab: int, train: PolicySamples,
                          val: PolicySamples) -> float:
    """val_l_text of a trivial predictor (nats a token): every labelled token of every validation sample scored by
    the frequencies of the training samples' label tokens, add-one smoothed over the `vocab` ids, each sample
    weighted as the batches weigh it (a frame carries its episode's text). A CoC loss above it has not learnt even
    which tokens the labels use; one far below it predicts tokens from their context."""
    def texts(samples: PolicySamples) -> Counter:  # {text: frames}
        episodes, frames = np.unique(samples.episode_of[samples.rows], return_counts=True)
        found = Counter()
        for e, n in zip(episodes.tolist(), frames.tolist(), strict=True):
            found[samples.coc[e]] += n
        return found

    counts: Counter = Counter()
    for text, frames in texts(train).items():
        for token in label_ids(text):
            counts[token] += frames
    total = sum(counts.values()) + vocab
    nats, tokens = 0.0, 0
    for text, frames in texts(val).items():
        ids = label_ids(text)
        nats -= frames * sum(math.log((counts[t] + 1) / total) for t in ids)
        tokens += frames * len(ids)
    return nats / tokens


def memory_modes(policy: FPlusPolicy, modes: tuple[str, ...]) -> tuple[str, ...]:
    """The modes that mean something for this policy: all of `modes` with an injected memory, else `none`."""
    return tuple(modes) if policy.injection is not None else ("none",)


def _world_sums(policy: FPlusPolicy, enc, sums: dict[str, list[float]]) -> None:
    """Add this batch's cosine sums and valid counts of the Prophet and the two baselines (both spaces)."""
    valid, z_future, z_pred = enc.future_valid, enc.z_future, enc.z_pred
    copy = enc.z_hist[:, -1:].expand_as(z_future)
    mean = torch.zeros_like(z_future)
    raw = policy.latent_norm.inverse
    raw_future = raw(z_future)
    candidates = {"prophet": (z_pred, z_future), "mean": (mean, z_future), "copy": (copy, z_future),
                  "prophet_raw": (raw(z_pred), raw_future), "mean_raw": (raw(mean), raw_future),
                  "copy_raw": (raw(copy), raw_future)}
    if policy.align is not None:  # FLARE: the FUT states' projection against the future (standardised)
        m = enc.fut_h.shape[1]
        candidates["align"] = (policy.align(enc.fut_h), z_future[:, :m])
    for key, (pred, target) in candidates.items():
        total, count = world_cosine_sums(pred, target, valid[:, :pred.shape[1]])
        sums[key][0] += float(total)
        sums[key][1] += float(count)


def scores_text(policy: FPlusPolicy, samples: PolicySamples) -> bool:
    """Whether an evaluation of `samples` scores the CoC text loss: a CoC policy and samples with CoC texts."""
    return policy.config.model.coc and samples.coc is not None


def evaluation_loader(policy: FPlusPolicy, samples: PolicySamples, batch_size: int, num_workers: int = 0,
                      persistent: bool = False) -> DataLoader:
    """The loader `evaluate_modes` reads: the samples in a fixed seeded random order (every pass the same), prompts
    built in the workers (with the CoC prompt when `scores_text`). persistent: the workers stay for the next pass
    (the training recipe validates many times with one loader)."""
    collate = Collate(policy.processor, coc_prompt=scores_text(policy, samples))
    return DataLoader(samples, batch_size=batch_size, collate_fn=collate, num_workers=num_workers,
                      sampler=EpochSampler(len(samples), SEED, shuffle=True),
                      persistent_workers=persistent and num_workers > 0, pin_memory=torch.cuda.is_available())


@torch.no_grad()
def evaluate_modes(policy: FPlusPolicy, samples: PolicySamples, modes: tuple[str, ...], batch_size: int,
                   max_batches: int | None = None, num_workers: int = 0, loader: DataLoader | None = None) -> dict:
    """{"modes": {mode: {mse_norm, mse_raw, mse_per_dim_raw, cos_world, samples, action_steps}}, "world": {prophet,
    mean, copy, prophet_raw, mean_raw, copy_raw[, align]} or None, "text": {l_text, tokens} or None, "skipped":
    {mode: reason}}; the MSEs average over valid action steps; l_text (a CoC policy on samples with CoC texts) is
    the next-token cross-entropy over every labelled token of every sample (all carry their CoC text, whatever
    COC_FRACTION trained on), predicted from prompts built apart from the plain ones the actions come from.
    `shuffle` is skipped (with its reason) when no batch mixes two episodes. Policies without an injected memory
    are evaluated under `none` only (the other modes cannot change them). `loader`: an `evaluation_loader` of the
    same policy, samples and batch size to read (its workers kept between calls); None: one for this call."""
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ConfigError(f"unknown corruption modes {bad}; valid: {', '.join(MODES)}, all")
    modes = memory_modes(policy, modes)
    was_training = policy.training
    policy.eval()
    device = policy.device
    generators = {m: torch.Generator().manual_seed(SEED + i) for i, m in enumerate(MODES)}
    noise = torch.Generator().manual_seed(SEED + len(MODES))  # flow head: one noise per batch for every mode
    sq_norm = {m: 0.0 for m in modes}
    sq_raw = {m: None for m in modes}
    count = {m: 0 for m in modes}
    n_samples = {m: 0 for m in modes}
    keys = [k for k in WORLD_METRICS if k != "align" or policy.align is not None]
    world = {k: [0.0, 0.0] for k in keys} if policy.prophet is not None else None
    text = [0.0, 0] if scores_text(policy, samples) else None  # (sum of L_text x tokens, tokens)
    if loader is None:
        loader = evaluation_loader(policy, samples, batch_size, num_workers)
    elif loader.dataset is not samples or loader.batch_size != batch_size:
        raise ConfigError("evaluate_modes: the loader reads other samples or another batch size")
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        episodes = batch["episode_index"]
        donors = shuffle_donors(episodes, generators["shuffle"]) if "shuffle" in modes else None
        active = [m for m in modes if m != "shuffle" or donors is not None]
        preds, enc = policy.predict_modes(batch, active, generators, None if donors is None else donors[0], noise)
        actions, pad = batch[K.ACTIONS], batch[K.ACTION_PAD]
        target = actions.to(device, torch.float32, non_blocking=actions.is_pinned())
        valid = (~pad.to(device, non_blocking=pad.is_pinned())).unsqueeze(-1).float()  # (B, H, 1)
        for mode, pred in preds.items():
            v = valid
            if mode == "shuffle":  # samples whose donor is from their own episode do not count
                v = valid * donors[1].to(device).float()[:, None, None]
            err_raw = ((pred - target) ** 2 * v).sum(dim=(0, 1))  # (A,)
            err_norm = ((policy.action_norm(pred) - policy.action_norm(target)) ** 2 * v).sum()
            sq_raw[mode] = err_raw if sq_raw[mode] is None else sq_raw[mode] + err_raw
            sq_norm[mode] += float(err_norm)
            count[mode] += int(v.sum())
            n_samples[mode] += len(episodes) if mode != "shuffle" else int(donors[1].sum())
        if world is not None:
            _world_sums(policy, enc, world)
        if text is not None:
            loss, tokens = policy.text_loss(batch)
            text[0] += float(loss) * tokens
            text[1] += tokens
    policy.train(was_training)
    if not any(count.values()):
        raise DataError("no validation samples to evaluate (VAL_FRACTION = 0?)")
    world_cos = None if world is None else {k: (t / c if c else None) for k, (t, c) in world.items()}
    out: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for mode in modes:
        if count[mode] == 0:  # only shuffle can end here
            skipped[mode] = ("no batch held samples of two episodes (validate on more episodes or with larger "
                             "batches)")
            continue
        per_dim = (sq_raw[mode] / count[mode]).cpu().numpy()
        out[mode] = {"mse_norm": sq_norm[mode] / (count[mode] * len(per_dim)), "mse_raw": float(per_dim.mean()),
                     "mse_per_dim_raw": per_dim.tolist(),
                     "cos_world": None if world_cos is None else world_cos["prophet"],
                     "samples": n_samples[mode], "action_steps": count[mode]}
    text_out = None if text is None or not text[1] else {"l_text": text[0] / text[1], "tokens": text[1]}
    return {"modes": out, "world": world_cos, "text": text_out, "skipped": skipped}
