"""Read run directories into plain numbers for the report (DESIGN 1, `fplus report`).

A run directory (written by `fplus.train.recipe`, evaluated by `fplus eval`):

    RUN/config.json                            settings (flat, incl. EXPERIMENT), policy, total_steps, ...
    RUN/metrics.jsonl                          `train` lines (loss terms, gate, ...) and `val` lines (per epoch)
    RUN/COMPLETE                               training finished
    RUN/eval/offline-step-XXXXXX.json          offline action MSE per corruption mode (optional)
    RUN/eval/sim-<simulator>-step-XXXXXX.json  closed-loop success per task and mode (optional)

`collect_run` turns one directory into a JSON-ready dict; anything missing (no eval yet, an unfinished run, an
empty metrics file) becomes None plus a human note, never an exception. Only a path that is not a run directory
at all (no readable config.json) is an error.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from fplus.errors import FplusError
from fplus.experiments import DESCRIPTIONS

CONFIG = "config.json"  # the same names as fplus.train.recipe (not imported: that module pulls in torch)
METRICS = "metrics.jsonl"
COMPLETE = "COMPLETE"
EVAL_DIR = "eval"

MODES = ("none", "zero", "random", "shuffle", "oracle")
"""The corruption modes in display order: fplus.model.corruption.MODES (not imported here: it pulls in torch)."""
LOSS_TERMS = ("loss", "l_action", "l_world", "l_text", "l_align")
"""Train-line loss terms, total first; a run logs the ones its experiment has."""
VAL_PREFIX = "val_mse_"
OFFLINE_RE = re.compile(r"^offline-step-(?P<step>\d+)\.json$")
SIM_RE = re.compile(r"^sim-(?P<sim>[A-Za-z0-9_.]+)-step-(?P<step>\d+)\.json$")

Record = dict[str, Any]


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FplusError(f"cannot read {what} {path}: {err}") from err


def check_run_dir(path: Path) -> Record:
    """The run's config.json, or an FplusError saying why `path` is not a run directory."""
    path = Path(path)
    if not path.exists():
        raise FplusError(f"{path} does not exist (expected a run directory such as OUTPUT_DIR/E2)")
    if not path.is_dir():
        raise FplusError(f"{path} is not a run directory (it is a file; expected a directory holding {CONFIG})")
    if not (path / CONFIG).is_file():
        inner = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / CONFIG).is_file())
        hint = f"; it contains the runs {', '.join(inner)}: pass those" if inner else ""
        raise FplusError(f"{path} is not a run directory ({CONFIG} missing){hint}")
    config = _read_json(path / CONFIG, "the run configuration")
    if not isinstance(config, dict) or not isinstance(config.get("settings"), dict):
        raise FplusError(f"{path / CONFIG} is not a run configuration (no `settings` object)")
    return config


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


def collect_offline(path: Path) -> Record:
    """One offline eval file, with the deltas vs `none` (normalised and raw)."""
    data = _read_json(path, "the offline evaluation")
    modes_in = data.get("modes") if isinstance(data, dict) else None
    if not isinstance(modes_in, dict):
        raise FplusError(f"{path} is not an offline evaluation (no `modes` object)")
    base = modes_in.get("none", {})
    modes: Record = {}
    for mode in _ordered_modes(modes_in):
        m = modes_in[mode]
        modes[mode] = {
            "mse_norm": m.get("mse_norm"), "mse_raw": m.get("mse_raw"),
            "delta_norm": None if mode == "none" else _delta(m.get("mse_norm"), base.get("mse_norm")),
            "delta_raw": None if mode == "none" else _delta(m.get("mse_raw"), base.get("mse_raw")),
            "mse_per_dim_raw": m.get("mse_per_dim_raw"), "cos_world": m.get("cos_world"), "samples": m.get("samples"),
        }
    return {"file": path.name, "step": data.get("step"), "gate": data.get("gate"), "modes": modes}


def collect_sim(path: Path, simulator: str) -> Record:
    """One closed-loop eval file: per task and overall, per mode {successes, episodes, rate, ci95}."""
    data = _read_json(path, "the closed-loop evaluation")
    if not isinstance(data, dict) or not isinstance(data.get("overall"), dict):
        raise FplusError(f"{path} is not a closed-loop evaluation (no `overall` object)")

    def cell(c: Record) -> Record:
        return {"successes": c.get("successes"), "episodes": c.get("episodes"), "rate": c.get("rate"),
                "ci95": list(c["ci95"]) if c.get("ci95") is not None else None}

    tasks = data.get("tasks") or {}
    return {"file": path.name, "simulator": data.get("simulator", simulator), "step": data.get("step"),
            "episodes_per_task": data.get("episodes_per_task"), "suite": data.get("suite"),
            "tasks": {t: {m: cell(per[m]) for m in _ordered_modes(per)} for t, per in tasks.items()},
            "overall": {m: cell(data["overall"][m]) for m in _ordered_modes(data["overall"])}}


def collect_run(path: Path) -> Record:
    """Everything the report shows about one run directory, as JSON-ready numbers (None = not available).

    Keys: name, path, experiment, description, complete, steps, total_steps, final_train {term: value},
    final_gate, val_latest {step, epoch, gate, modes {mode: {mse, delta}}}, val_history [{step, epoch, gate,
    modes {mode: mse}}], offline (see `collect_offline`) | None, sim {simulator: ...} (see `collect_sim`),
    notes [str].
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

    last = train[-1] if train else None
    final_train = {t: float(last[t]) for t in LOSS_TERMS if last is not None and last.get(t) is not None}
    gates = [r["gate"] for r in train if r.get("gate") is not None]
    final_gate = float(gates[-1]) if gates else None

    history = [{"step": r["step"], "epoch": r.get("epoch"), "gate": _gate_at(r["step"], r, train),
                "modes": val_modes(r)} for r in val]
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

    offline_files = _newest(path / EVAL_DIR, OFFLINE_RE)
    offline = collect_offline(offline_files[""][1]) if offline_files else None
    if offline is None:
        notes.append(f"no offline eval yet (`fplus eval {path}`)")
    elif steps is not None and offline["step"] is not None and offline["step"] != steps:
        notes.append(f"offline eval is of step {offline['step']}, training is at step {steps}")
    sim = {name: collect_sim(p, name) for name, (_, p) in sorted(_newest(path / EVAL_DIR, SIM_RE).items())}
    if not sim:
        notes.append("no closed-loop eval yet")

    return {"name": path.name, "path": str(path), "experiment": experiment,
            "description": DESCRIPTIONS.get(experiment or "", "custom run" if experiment is None else ""),
            "dataset": settings.get("DATASET"), "backbone": settings.get("BACKBONE"),
            "complete": complete, "steps": steps, "total_steps": total,
            "steps_per_epoch": config.get("steps_per_epoch"),
            "final_train": final_train, "final_gate": final_gate, "val_latest": val_latest, "val_history": history,
            "offline": offline, "sim": sim, "notes": notes}


def collect(runs: list[Path]) -> Record:
    """The report's numbers for several runs, each labelled uniquely (the experiment id, or the directory name
    when two runs share an id). Raises FplusError on the first path that is not a run directory."""
    if not runs:
        raise FplusError("no runs given: pass one or more run directories (OUTPUT_DIR/<experiment>)")
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
        t for t in LOSS_TERMS if any(t in r["final_train"] for r in collected)]}


def train_series(path: Path) -> tuple[list[Record], list[Record]]:
    """(train lines, val lines) of a run, for the plots."""
    train, val, _ = read_metrics(Path(path) / METRICS)
    return train, val
