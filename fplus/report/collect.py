"""Read run directories into plain numbers for the report (DESIGN 1, `fplus report`).

A run directory (written by `fplus.train.recipe`, evaluated by `fplus eval`):

    RUN/config.json                            settings (flat, incl. EXPERIMENT), policy (prophet, injection,
                                               ...), total_steps, ...
    RUN/metrics.jsonl                          `train` lines (loss terms, gate, ...) and `val` lines (per epoch:
                                               val_mse_<mode>, gate, val_cos_world[_mean|_copy][_raw])
    RUN/COMPLETE                               training finished
    RUN/eval/offline-step-XXXXXX.json          offline action MSE per corruption mode, `world` cosines (optional)
    RUN/eval/sim-<simulator>-step-XXXXXX.json  closed-loop success per task and mode (optional), and per chunking
                                               strategy and inference delay (`latency`, optional)
    RUN/checkpoints/step-XXXXXX/policy/config.json  the policy config of each checkpoint: one that is not the run's
                                               own (copied from another run) is noted, and the evaluations of it
                                               are not reported as the run's experiment

A run without an injected memory (config.json `policy.injection` false: E0, E1, E3) has nothing for the corruption
modes to act on: only `none` is kept of its results (a number under `zero` would only repeat `none` plus noise).

`collect_run` turns one directory into a JSON-ready dict; anything missing (no eval yet, an unfinished run, an
empty metrics file) becomes None plus a human note, never an exception. Only a path that is not a run directory
at all (no readable config.json) is an error.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from fplus.checkpoint import policy_differences
from fplus.errors import CheckpointError
from fplus.experiments import EXPERIMENTS
from fplus.io import read_json
from fplus.report.seeds import DEFAULT_BASELINE, aggregate
from fplus.rundir import (
    CHECKPOINT_RE,
    CHECKPOINTS,
    COMPLETE,
    CONFIG,
    EVAL_DIR,
    METRICS,
    OFFLINE_RE,
    SIM_RE,
    read_run_config,
)

MODES = ("none", "zero", "random", "shuffle", "oracle", "history")
"""The corruption modes in display order: fplus.model.corruption.MODES (not imported here: it pulls in torch)."""
MEMORY_MODES = MODES[1:]
"""The modes that replace the injected memory: meaningless for a run without one."""
LOSS_TERMS = ("loss", "l_action", "l_world", "l_text", "l_align")
"""Train-line loss terms, total first; a run logs the ones its experiment has."""
VAL_PREFIX = "val_mse_"
WORLD_KEYS = {"prophet": "val_cos_world", "mean": "val_cos_world_mean", "copy": "val_cos_world_copy",
              "prophet_raw": "val_cos_world_raw", "mean_raw": "val_cos_world_mean_raw",
              "copy_raw": "val_cos_world_copy_raw"}
"""World-cosine numbers of a val line (the offline eval's `world` object uses the keys): cos(z_pred, z_future) of
the Prophet and of two baselines (predict the training mean; copy-last = z_t repeated), in the standardised latent
space the loss uses and in the raw encoder space (`_raw`)."""
Record = dict[str, Any]
STRATEGIES = ("sync", "naive", "rtc")
"""The chunking strategies in display order: fplus.deploy.chunking.STRATEGIES (not imported: the report sits below
deploy)."""


def _read_json(path: Path, what: str) -> Any:
    return read_json(path, what, "evaluate the checkpoint again (fplus eval) to rewrite it")


def check_run_dir(path: Path) -> Record:
    """The run's config.json, or an FplusError saying why `path` is not a run directory (fplus.rundir)."""
    return read_run_config(path)


def read_metrics(path: Path) -> tuple[list[Record], list[Record], list[str]]:
    """(train lines, val lines, notes) of a metrics.jsonl; unreadable lines are skipped with a note (a run being
    written may end in a partial line)."""
    if not path.is_file():
        return [], [], [f"no {METRICS} yet"]
    train: list[Record] = []
    val: list[Record] = []
    bad = 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if not isinstance(record, dict) or "step" not in record:
            bad += 1
        elif record.get("kind") == "train":
            train.append(record)
        elif record.get("kind") == "val":
            val.append(record)
    notes = [f"{bad} unreadable line(s) in {METRICS} skipped"] if bad else []
    if not train:
        notes.append("no training metrics logged yet")
    return train, val, notes


def _newest(directory: Path, pattern: re.Pattern[str]) -> dict[str, tuple[int, Path]]:
    """The newest file (highest step) per group (the simulator for sim files, "" for offline files)."""
    found: dict[str, tuple[int, Path]] = {}
    if not directory.is_dir():
        return found
    for p in directory.iterdir():
        m = pattern.match(p.name)
        if not m or not p.is_file():
            continue
        key = m.groupdict().get("sim", "")
        step = int(m.group("step"))
        if key not in found or step > found[key][0]:
            found[key] = (step, p)
    return found


def _delta(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None else value - base


def _ordered_modes(names) -> list[str]:
    """Corruption modes in the canonical order (`none` first), unknown ones after, alphabetically."""
    names = set(names)
    return [m for m in MODES if m in names] + sorted(names - set(MODES))


def val_modes(record: Record) -> dict[str, float]:
    """{mode: normalised val MSE} of one val line."""
    out = {k[len(VAL_PREFIX):]: v for k, v in record.items() if k.startswith(VAL_PREFIX) and v is not None}
    return {m: float(out[m]) for m in _ordered_modes(out)}


def _gate_at(step: int, record: Record, train: list[Record]) -> float | None:
    """The gate of a val line; if the line lacks it, the last train gate logged at or before its step."""
    if record.get("gate") is not None:
        return float(record["gate"])
    before = [r["gate"] for r in train if r["step"] <= step and r.get("gate") is not None]
    return float(before[-1]) if before else None


def _policy_flag(config: Record, key: str) -> bool | None:
    """config.json `policy.model.<key>` (`policy.<key>` in runs of fplus <= 0.1) when it is a bool (`injection`,
    `prophet`), else None (the config does not say)."""
    policy = config.get("policy")
    if isinstance(policy, dict) and isinstance(policy.get("model"), dict):
        policy = policy["model"]
    value = policy.get(key) if isinstance(policy, dict) else None
    return value if isinstance(value, bool) else None


def _keep_modes(modes: Record, memory: bool) -> Record:
    """`modes` in display order, without the memory modes when the run has no injected memory."""
    return {m: modes[m] for m in _ordered_modes(modes) if memory or m not in MEMORY_MODES}


def val_world(record: Record) -> Record | None:
    """{prophet, mean, copy, prophet_raw, mean_raw, copy_raw} (None where not logged) of one val line, or None when
    it has no world-cosine number."""
    out = {k: None if record.get(key) is None else float(record[key]) for k, key in WORLD_KEYS.items()}
    return out if any(v is not None for v in out.values()) else None


def delta_gate_points(run: Record) -> dict[str, list[tuple[float, float]]]:
    """What the delta-vs-gate figure draws: {mode: [(gate, val MSE(mode) - val MSE(none)), ...]} over the run's
    validation lines (in order) that have a gate and both MSEs; {} for a run without an injected memory."""
    if not run.get("has_memory", True):
        return {}
    points: dict[str, list[tuple[float, float]]] = {}
    for h in run["val_history"]:
        if h["gate"] is None or "none" not in h["modes"]:
            continue
        for mode, mse in h["modes"].items():
            if mode != "none":
                points.setdefault(mode, []).append((h["gate"], mse - h["modes"]["none"]))
    return {m: points[m] for m in _ordered_modes(points)}


def world_series(run: Record) -> dict[str, list[tuple[int, float]]]:
    """What the world-cosine figure draws: {prophet | mean | copy: [(step, cos), ...]} of the standardised-space
    cosines over the run's validation lines; {} for a run without them."""
    series: dict[str, list[tuple[int, float]]] = {}
    for h in run.get("world", {}).get("history", []):
        for k in ("prophet", "mean", "copy"):
            if h[k] is not None:
                series.setdefault(k, []).append((h["step"], h[k]))
    return series


def collect_offline(path: Path, memory: bool = True) -> Record:
    """One offline eval file, with the deltas vs `none` (normalised and raw) and the world cosines (`world`: None
    for a run without a Prophet). memory=False keeps only `none` (a run without an injected memory)."""
    data = _read_json(path, "the offline evaluation")
    modes_in = data.get("modes") if isinstance(data, dict) else None
    if not isinstance(modes_in, dict):
        raise CheckpointError(f"{path} is not an offline evaluation (no `modes` object)")
    base = modes_in.get("none", {})
    modes: Record = {}
    for mode in _keep_modes(modes_in, memory):
        m = modes_in[mode]
        modes[mode] = {
            "mse_norm": m.get("mse_norm"), "mse_raw": m.get("mse_raw"),
            "delta_norm": None if mode == "none" else _delta(m.get("mse_norm"), base.get("mse_norm")),
            "delta_raw": None if mode == "none" else _delta(m.get("mse_raw"), base.get("mse_raw")),
            "mse_per_dim_raw": m.get("mse_per_dim_raw"), "cos_world": m.get("cos_world"), "samples": m.get("samples"),
        }
    world = data.get("world")
    if isinstance(world, dict):
        world = {k: None if world.get(k) is None else float(world[k]) for k in WORLD_KEYS}
    else:
        world = None
    return {"file": path.name, "step": data.get("step"), "gate": data.get("gate"), "modes": modes, "world": world,
            "dropped": [] if memory else [m for m in _ordered_modes(modes_in) if m in MEMORY_MODES]}


def _episodes_per_mode(data: Record, tasks: Record, modes: list[str]) -> dict[str, int | None]:
    """Episodes per task of each mode: the file's `episodes_per_mode`, else the one count its task cells share, else
    `episodes_per_task` (files written before modes could differ)."""
    given = data.get("episodes_per_mode") if isinstance(data.get("episodes_per_mode"), dict) else {}
    out: dict[str, int | None] = {}
    for mode in modes:
        counts = {per[mode].get("episodes") for per in tasks.values()
                  if mode in per and per[mode].get("successes") is not None}
        if given.get(mode) is not None:
            out[mode] = given[mode]
        elif len(counts) == 1:
            out[mode] = counts.pop()
        else:
            out[mode] = data.get("episodes_per_task")
    return out


def collect_sim(path: Path, simulator: str, memory: bool = True) -> Record:
    """One closed-loop eval file: per task and overall, per mode {successes, episodes, rate, ci95, note}, and the
    episodes per task of each mode of `overall` (`episodes_per_mode`). memory=False keeps only `none`."""
    data = _read_json(path, "the closed-loop evaluation")
    if not isinstance(data, dict) or not isinstance(data.get("overall"), dict):
        raise CheckpointError(f"{path} is not a closed-loop evaluation (no `overall` object)")

    def cell(c: Record) -> Record:
        out = {"successes": c.get("successes"), "episodes": c.get("episodes"), "rate": c.get("rate"),
               "ci95": list(c["ci95"]) if c.get("ci95") is not None else None}
        if c.get("note"):
            out["note"] = c["note"]
        return out

    tasks_in = data.get("tasks") or {}
    tasks = {t: {m: cell(c) for m, c in _keep_modes(per, memory).items()} for t, per in tasks_in.items()}
    latency = collect_latency(data.get("latency"), cell)
    overall = {m: cell(c) for m, c in _keep_modes(data["overall"], memory).items()}
    present = set(data["overall"]) | {m for per in tasks_in.values() for m in per}
    return {"file": path.name, "simulator": data.get("simulator", simulator), "step": data.get("step"),
            "episodes_per_task": data.get("episodes_per_task"),
            "episodes_per_mode": _episodes_per_mode(data, tasks, list(overall)), "suite": data.get("suite"),
            "tasks": tasks, "overall": overall, "latency": latency,
            "n_action_steps": data.get("n_action_steps"),
            "dropped": [] if memory else [m for m in _ordered_modes(present) if m in MEMORY_MODES]}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def collect_latency(section: Any, cell) -> list[Record]:
    """The rows of a closed-loop file's `latency` section (fplus.eval.closed_loop), strategies in STRATEGIES
    order, delays ascending: {chunking, inference_delay, execution_horizon, successes, episodes, rate, ci95 (the
    overall cell, `cell` applied), boundary, within (mean |a_t - a_(t-1)| at chunk boundaries and within chunks),
    ratio (boundary / within), idle_per_episode, tasks {task: cell}}. Entries without an overall rate are left
    out; no section: []."""
    if not isinstance(section, dict):
        return []
    rows = []
    for strategy, by_delay in section.items():
        if not isinstance(by_delay, dict):
            continue
        for delay, entry in by_delay.items():
            overall = entry.get("overall") if isinstance(entry, dict) else None
            if not isinstance(overall, dict) or _number(overall.get("rate")) is None or not str(delay).isdigit():
                continue
            smooth = overall.get("smoothness") if isinstance(overall.get("smoothness"), dict) else {}
            boundary, within = _number(smooth.get("boundary")), _number(smooth.get("within"))
            episodes, idle = overall.get("episodes"), _number(overall.get("idle_steps"))
            tasks = entry.get("tasks") if isinstance(entry.get("tasks"), dict) else {}
            rows.append({"chunking": str(strategy), "inference_delay": int(delay),
                         "execution_horizon": entry.get("execution_horizon"), **cell(overall),
                         "boundary": boundary, "within": within,
                         "ratio": boundary / within if boundary is not None and within else None,
                         "idle_per_episode": idle / episodes if idle is not None and episodes else None,
                         "tasks": {t: cell(c) for t, c in tasks.items() if isinstance(c, dict)}})
    order = {s: i for i, s in enumerate(STRATEGIES)}
    return sorted(rows, key=lambda r: (order.get(r["chunking"], len(order)), r["chunking"], r["inference_delay"]))


def latency_series(sim: Record) -> dict[str, list[Record]]:
    """What the latency figure draws of one run's closed-loop results: {strategy: its rows (ascending delay)}."""
    series: dict[str, list[Record]] = {}
    for row in sim.get("latency") or []:
        series.setdefault(row["chunking"], []).append(row)
    return series


def foreign_checkpoints(path: Path, config: Record) -> dict[int, str]:
    """{step: what differs} of the checkpoints whose policy config (step-N/policy/config.json) is not the run's
    (config.json `policy`), e.g. {6: "model.injection: checkpoint false, run true"}: a checkpoint copied from another
    run. Plain JSON (the report never imports torch); unreadable configs are left to the evaluation to report."""
    run_policy = config.get("policy")
    root = Path(path) / CHECKPOINTS
    if not isinstance(run_policy, dict) or not root.is_dir():
        return {}
    out: dict[int, str] = {}
    for d in sorted(root.iterdir()):
        m = CHECKPOINT_RE.match(d.name)
        if not m or not (d / "policy" / CONFIG).is_file():
            continue
        try:
            theirs = json.loads((d / "policy" / CONFIG).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(theirs, dict):
            continue
        diffs = policy_differences(theirs, run_policy)
        if diffs:
            out[int(m.group("step"))] = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4
                                                                 else "")
    return out


def collect_run(path: Path) -> Record:
    """Everything the report shows about one run directory, as JSON-ready numbers (None = not available).

    Keys: name, path, experiment, seed and split_seed (config.json settings.SEED, SPLIT_SEED; None if absent),
    description, complete, steps, total_steps, has_memory (an injected memory:
    config.json `policy.injection`, else whether memory modes were evaluated), has_prophet, final_train
    {term: value}, final_gate, val_latest {step, epoch, gate, modes {mode: {mse, delta}}}, val_history [{step,
    epoch, gate, modes {mode: mse}}], world {latest {step, prophet, mean, copy, prophet_raw, mean_raw, copy_raw} |
    None, history [the same per val line]}, offline (see `collect_offline`) | None, sim {simulator: ...} (see
    `collect_sim`), foreign_checkpoints [{step, differs}] (checkpoints whose policy is not the run's: their
    evaluations are left out), notes [str]. Without an injected memory only `none` is kept of the corruption modes.
    """
    path = Path(path)
    config = check_run_dir(path)
    settings = config["settings"]
    experiment = settings.get("EXPERIMENT") or None
    train, val, notes = read_metrics(path / METRICS)
    complete = (path / COMPLETE).is_file()
    total = config.get("total_steps")
    steps = max([r["step"] for r in train + val], default=None)
    if not complete:
        notes.append(f"training not complete (step {steps if steps is not None else 0}"
                     + (f" of {total})" if total is not None else ")"))
    injection = _policy_flag(config, "injection")
    memory = injection is not False  # unknown: keep every mode, decide below from what was evaluated

    last = train[-1] if train else None
    final_train = {t: float(last[t]) for t in LOSS_TERMS if last is not None and last.get(t) is not None}
    gates = [r["gate"] for r in train if r.get("gate") is not None]
    final_gate = float(gates[-1]) if gates else None

    history = [{"step": r["step"], "epoch": r.get("epoch"), "gate": _gate_at(r["step"], r, train),
                "modes": _keep_modes(val_modes(r), memory)} for r in val]
    dropped = _ordered_modes({m for r in val for m in val_modes(r)} - {m for h in history for m in h["modes"]})
    scored = [h for h in history if h["modes"]]
    val_latest = None
    if scored:
        h = scored[-1]
        base = h["modes"].get("none")
        val_latest = {"step": h["step"], "epoch": h["epoch"], "gate": h["gate"],
                      "modes": {m: {"mse": v, "delta": None if m == "none" else _delta(v, base)}
                                for m, v in h["modes"].items()}}
    else:
        notes.append("no validation line yet")
    world_history = [{"step": r["step"], **w} for r in val if (w := val_world(r)) is not None]
    world = {"latest": world_history[-1] if world_history else None, "history": world_history}
    texts = [r for r in val if r.get("val_l_text") is not None]
    text = None if not texts else {"step": texts[-1]["step"], "l_text": float(texts[-1]["val_l_text"]),
                                   "unigram": None if texts[-1].get("val_l_text_unigram") is None
                                   else float(texts[-1]["val_l_text_unigram"])}

    offline_files = _newest(path / EVAL_DIR, OFFLINE_RE)
    offline = collect_offline(offline_files[""][1], memory) if offline_files else None
    if offline is None:
        notes.append(f"no offline eval yet (`fplus eval {path}`)")
    elif steps is not None and offline["step"] is not None and offline["step"] != steps:
        notes.append(f"offline eval is of step {offline['step']}, training is at step {steps}")
    sim = {name: collect_sim(p, name, memory) for name, (_, p) in sorted(_newest(path / EVAL_DIR, SIM_RE).items())}
    foreign = foreign_checkpoints(path, config)
    label = experiment or "this run"
    for step, diff in foreign.items():
        notes.append(f"checkpoint step-{step:06d} is not this run's policy ({path / CHECKPOINTS}/step-{step:06d}/"
                     f"policy/{CONFIG} differs from {path / CONFIG}: {diff}); it was copied from another run")
    if offline is not None and offline["step"] in foreign:
        notes.append(f"offline eval {offline['file']} is of that foreign checkpoint: not reported as {label}")
        offline = None
    for name in [n for n, s in sim.items() if s["step"] in foreign]:
        notes.append(f"closed-loop eval {sim.pop(name)['file']} is of that foreign checkpoint: not reported as "
                     f"{label}")
    if not sim:
        notes.append("no closed-loop eval yet")

    if injection is None:
        found = [m for h in history for m in h["modes"]] + list((offline or {}).get("modes", {}))
        found += [m for s in sim.values() for m in s["overall"]]
        has_memory = any(m in MEMORY_MODES for m in found)
    else:
        has_memory = injection
    prophet = _policy_flag(config, "prophet")
    has_prophet = prophet if prophet is not None else bool(world_history or (offline or {}).get("world"))
    for where, modes in [("validation", dropped), *([(offline["file"], offline["dropped"])] if offline else []),
                         *((s["file"], s["dropped"]) for s in sim.values())]:
        if modes:
            notes.append(f"no injected memory (config.json policy.injection is false): the {', '.join(modes)} "
                         f"results of {where} are not shown")

    return {"name": path.name, "path": str(path), "experiment": experiment, "seed": settings.get("SEED"),
            "split_seed": settings.get("SPLIT_SEED"),
            "description": EXPERIMENTS[experiment].description if experiment in EXPERIMENTS
            else ("custom run" if experiment is None else ""),
            "dataset": settings.get("DATASET"), "backbone": settings.get("BACKBONE"),
            "complete": complete, "steps": steps, "total_steps": total,
            "steps_per_epoch": config.get("steps_per_epoch"), "has_memory": has_memory, "has_prophet": has_prophet,
            "final_train": final_train, "final_gate": final_gate, "val_latest": val_latest, "val_history": history,
            "world": world, "text": text, "offline": offline, "sim": sim,
            "foreign_checkpoints": [{"step": k, "differs": v} for k, v in foreign.items()], "notes": notes}


def collect(runs: list[Path], baseline: str = DEFAULT_BASELINE) -> Record:
    """The report's numbers for several runs, each labelled uniquely (the experiment id, or the directory name
    when two runs share an id), and `seeds`: the runs grouped by experiment with their aggregates over seeds and
    the paired differences against `baseline` (fplus.report.seeds.aggregate). Raises FplusError on the first path
    that is not a run directory."""
    if not runs:
        raise CheckpointError("no runs given: pass one or more run directories (OUTPUT_DIR/<experiment>)")
    collected = [collect_run(Path(r)) for r in runs]
    ids = [r["experiment"] or r["name"] for r in collected]
    for r, rid in zip(collected, ids, strict=True):
        r["label"] = rid if ids.count(rid) == 1 else f"{rid} ({r['name']})"
    labels = [r["label"] for r in collected]
    for i, r in enumerate(collected):  # still clashing (same id, same directory name): number them
        if labels.count(r["label"]) > 1:
            r["label"] = f"{r['label']} #{i + 1}"
    modes = set()
    for r in collected:
        modes |= set((r["val_latest"] or {}).get("modes", {})) | set((r["offline"] or {}).get("modes", {}))
    return {"runs": collected, "modes": _ordered_modes(modes), "loss_terms": [
        t for t in LOSS_TERMS if any(t in r["final_train"] for r in collected)],
        "seeds": aggregate(collected, MODES, baseline)}


def train_series(path: Path) -> tuple[list[Record], list[Record]]:
    """(train lines, val lines) of a run, for the plots."""
    train, val, _ = read_metrics(Path(path) / METRICS)
    return train, val
