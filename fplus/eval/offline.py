"""Offline evaluation: action error on held-out episodes under each corruption of the future memory.

`evaluate_modes` is the one evaluation loop; the training recipe's per-epoch validation and `fplus eval` both
call it. Per mode it reports the masked MSE of the predicted action chunks in normalised units (the training
loss's units) and in raw units (overall and per action dimension), and the Prophet's cos(z_pred, z_future).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from fplus import batch as K
from fplus.errors import FplusError
from fplus.io import write_text_atomic
from fplus.model.corruption import MODES
from fplus.model.policy import FPlusPolicy
from fplus.model.prophet import world_loss
from fplus.train.data import EpochSampler, PolicySamples, collate

SEED = 12345  # random and shuffle corruptions draw from this seed: every evaluation sees the same corruption


@torch.no_grad()
def evaluate_modes(policy: FPlusPolicy, samples: PolicySamples, modes: tuple[str, ...], batch_size: int,
                   max_batches: int | None = None, num_workers: int = 0) -> dict[str, dict]:
    """{mode: {mse_norm, mse_raw, mse_per_dim_raw, cos_world, samples, action_steps}} over `samples` (in order);
    the MSEs average over the valid (non-padded) action steps.

    A batch of one sample is skipped for `shuffle` (there is no other sample to take the memory from).
    """
    was_training = policy.training
    policy.eval()
    device = policy.action_head.step.device
    out: dict[str, dict] = {}
    for mode in modes:
        if mode not in MODES:
            raise FplusError(f"unknown corruption mode {mode!r}; valid: {', '.join(MODES)}, all")
        generator = torch.Generator().manual_seed(SEED)
        sq_norm = sq_raw = None
        count = n_samples = 0
        cos_sum, cos_n = 0.0, 0
        loader = DataLoader(samples, batch_size=batch_size, collate_fn=collate, num_workers=num_workers,
                            sampler=EpochSampler(len(samples), 0, shuffle=False))
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            n = len(batch["index"])
            if mode == "shuffle" and n < 2:
                continue
            pred = policy.predict_action_chunk(batch, corruption=mode, generator=generator)  # (B, H, A) raw
            target = batch[K.ACTIONS].to(device, torch.float32)
            valid = (~batch[K.ACTION_PAD].to(device)).unsqueeze(-1).float()  # (B, H, 1)
            err_raw = ((pred - target) ** 2 * valid).sum(dim=(0, 1))  # (A,)
            err_norm = ((policy.action_norm(pred) - policy.action_norm(target)) ** 2 * valid).sum(dim=(0, 1))
            sq_raw = err_raw if sq_raw is None else sq_raw + err_raw
            sq_norm = err_norm if sq_norm is None else sq_norm + err_norm
            count += int(valid.sum())
            n_samples += n
            if policy.prophet is not None:
                z_pred = policy.prophet(batch[K.Z_HIST].to(device, torch.float32))
                _, cos = world_loss(z_pred, batch[K.Z_FUTURE].to(device), batch[K.FUTURE_VALID].to(device))
                cos_sum += float(cos) * n
                cos_n += n
        if count == 0:
            raise FplusError("no validation samples to evaluate (VAL_FRACTION = 0?)")
        per_dim = (sq_raw / count).cpu().numpy()
        out[mode] = {"mse_norm": float(sq_norm.sum() / (count * len(per_dim))), "mse_raw": float(per_dim.mean()),
                     "mse_per_dim_raw": per_dim.tolist(), "cos_world": cos_sum / cos_n if cos_n else None,
                     "samples": n_samples, "action_steps": count}
    policy.train(was_training)
    return out


def resolve_device(device: str) -> str:
    """`auto` -> cuda when available, else cpu; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def evaluate_run(run_dir: Path, modes: tuple[str, ...], step: int | None = None, batch_size: int | None = None,
                 max_batches: int | None = None, device: str | None = None) -> tuple[dict, Path]:
    """Evaluate a run's checkpoint (default: the newest valid) on its own validation episodes with its own
    settings (from config.json), and write RUN/eval/offline-step-XXXXXX.json (merged with the modes an earlier
    evaluation of that checkpoint wrote). Returns (result for all modes in the file, path).
    `device` None: the run's EVAL_DEVICE (auto: cuda when available)."""
    from fplus.data.lerobot import LeRobotDataset, keys_from_settings
    from fplus.data.split import Split
    from fplus.train import checkpoint as ckpt
    from fplus.train.recipe import CONFIG, SPLIT, settings_from_run

    run_dir = Path(run_dir)
    settings = settings_from_run(run_dir)
    config = json.loads((run_dir / CONFIG).read_text())
    path = ckpt.checkpoint_for(run_dir, step)
    policy = FPlusPolicy.load(path / "policy", device=resolve_device(device or settings.eval.device))
    keys = keys_from_settings(settings.data)
    ds = LeRobotDataset.open(settings.data.dataset, keys, revision=settings.data.revision)
    if ds.fingerprint != config["dataset_fingerprint"]:
        raise FplusError(f"the dataset {settings.data.dataset} changed since {run_dir} was trained "
                         f"(fingerprint {ds.fingerprint} != {config['dataset_fingerprint']})")
    split = Split.load(run_dir / SPLIT)
    latents = None
    if policy.config.world_dim:
        from fplus.world.cache import find_latents

        w = settings.world
        encoder = w.dino_model if w.source == "dino" else w.vjepa_model
        _, latents = find_latents(w.cache_dir, ds, keys.image, w.source, encoder, w.pooling, w.temporal_window)
    samples = PolicySamples(ds, keys, split.val, policy.config.action_horizon, policy.config.history,
                            policy.config.future, latents=None if latents is None else np.asarray(latents))
    results = evaluate_modes(policy, samples, modes, batch_size or settings.train.batch_size, max_batches)
    step_done = json.loads((path / ckpt.MANIFEST).read_text())["step"]
    result = {"run": str(run_dir), "experiment": settings.train.experiment, "step": step_done,
              "gate": policy.injection.gate_value if policy.injection is not None else None,
              "action_names": ds.features[keys.action].get("names"), "modes": results}
    out = run_dir / "eval" / f"offline-step-{step_done:06d}.json"
    if out.is_file():  # an evaluation of other modes of this checkpoint: keep them, newest values win
        merged = {**json.loads(out.read_text())["modes"], **results}
        result["modes"] = {m: merged[m] for m in MODES if m in merged}
    write_text_atomic(out, json.dumps(result, indent=2))
    return result, out


def results_table(result: dict):
    """A Rich table of one offline evaluation (one row per corruption mode)."""
    from rich.table import Table

    names = result.get("action_names") or []
    table = Table(title=f"{result['run']}  {result['experiment'] or 'custom'}  step {result['step']}"
                  + (f"  gate {result['gate']:+.4f}" if result["gate"] is not None else ""), title_justify="left")
    for col in ("corruption", "MSE (norm.)", "Δ vs none", "MSE (raw)", "per-dim MSE (raw)", "cos world", "samples"):
        table.add_column(col, justify="right" if col not in ("corruption", "per-dim MSE (raw)") else "left")
    base = result["modes"].get("none", {}).get("mse_norm")
    for mode, m in result["modes"].items():
        delta = "" if base is None or mode == "none" else f"{m['mse_norm'] - base:+.3g}"
        dims = " ".join(f"{(names[i] if i < len(names) else i)}={v:.4g}" for i, v in enumerate(m["mse_per_dim_raw"]))
        cos = "n/a" if m["cos_world"] is None else f"{m['cos_world']:.4f}"
        table.add_row(mode, f"{m['mse_norm']:.4f}", delta, f"{m['mse_raw']:.4g}", dims, cos, str(m["samples"]))
    return table
