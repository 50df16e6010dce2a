"""Offline evaluation of a trained run: `evaluate_run` loads a checkpoint (fplus.rundir.load_run,
fplus.deploy.loader.open_run), runs the one evaluation loop (fplus.train.validation.evaluate_modes) on the run's own
validation episodes under every corruption mode, and writes RUN/eval/offline-step-XXXXXX.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from fplus.errors import CheckpointError
from fplus.io import write_text_atomic
from fplus.model.corruption import MODES
from fplus.train.data import PolicySamples, default_workers
from fplus.train.validation import evaluate_modes, memory_modes


def evaluate_run(run_dir: Path, modes: tuple[str, ...], step: int | None = None, batch_size: int | None = None,
                 max_batches: int | None = None, device: str | None = None,
                 local: dict | None = None) -> tuple[dict, Path]:
    """Evaluate a run's checkpoint (default: the newest valid) on its own validation episodes with its own
    settings (from config.json), and write RUN/eval/offline-step-XXXXXX.json (merged with the modes an earlier
    evaluation of that checkpoint wrote). Returns (result for all modes in the file, path). The run is read by
    `fplus.rundir.load_run` and opened by `fplus.deploy.loader.open_run` (a checkpoint copied from another run and a
    changed dataset are refused). `device` None: the run's EVAL_DEVICE (auto: cuda when available). An exported
    folder (fplus export) is evaluated the same way (`fplus.deploy.loader.load_any`, with this machine's `local`
    DATASET / DATASET_REVISION / CACHE_DIR) and its results go to OUT/eval/offline-step-XXXXXX.json."""
    from fplus.data.split import Split
    from fplus.deploy.loader import load_any, open_run
    from fplus.rundir import offline_result

    run = load_any(Path(run_dir), step, local)
    out = offline_result(run.dir, run.step)
    earlier = _earlier_modes(out)  # read before the evaluation: a damaged file fails now, not after it
    opened = open_run(run, device)
    policy, ds, keys, settings = opened.policy, opened.dataset, opened.keys, run.settings
    split = Split.load(run.split_path)
    samples = PolicySamples(ds, keys, split.val, policy.config.model.action_horizon, policy.config.history,
                            policy.config.future, latents=opened.latents())
    evaluated = evaluate_modes(policy, samples, modes, batch_size or settings.train.batch_size, max_batches,
                               num_workers=default_workers(settings.train.num_workers))
    results = evaluated["modes"]
    result = {"run": str(run.dir), "experiment": settings.train.experiment, "step": run.step,
              "gate": policy.injection.gate_value if policy.injection is not None else None,
              "action_names": ds.features[keys.action].get("names"), "modes": results,
              "world": evaluated["world"], "text": evaluated["text"], "skipped": evaluated["skipped"]}
    if earlier:  # an evaluation of other modes of this checkpoint: keep them, newest values win
        merged = {**earlier, **results}
        result["modes"] = {m: merged[m] for m in memory_modes(policy, MODES) if m in merged}
    write_text_atomic(out, json.dumps(result, indent=2))
    return result, out


def _earlier_modes(path: Path) -> dict:
    """The `modes` of an earlier evaluation file of the same checkpoint ({} when there is none)."""
    if not path.is_file():
        return {}
    from fplus.io import read_json

    fix = "delete it (the evaluation writes it again) or restore it"
    data = read_json(path, "the earlier offline evaluation", fix)
    if not isinstance(data, dict) or not isinstance(data.get("modes"), dict):
        raise CheckpointError(f"{path} is not an offline evaluation (no `modes` object); {fix}")
    return data["modes"]


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
    world = result.get("world")
    if world:
        def f(key: str) -> str:
            return "n/a" if world.get(key) is None else f"{world[key]:.4f}"

        table.caption = (f"world cosine, standardised: Prophet {f('prophet')}, training mean {f('mean')}, copy-last "
                         f"{f('copy')}; raw latents: Prophet {f('prophet_raw')}, mean {f('mean_raw')}, copy-last "
                         f"{f('copy_raw')}")
    return table
