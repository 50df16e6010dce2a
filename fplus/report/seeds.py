"""Seed aggregates of the report: runs grouped by experiment, the mean, 95% interval and n over seeds of every
number the report shows, paired differences against a baseline experiment, and the bands of the learning curves.

`fplus matrix` with MATRIX_SEEDS=0,1,2 trains OUTPUT_DIR/E0-seed0, E0-seed1, ..., E2-seed0, ...; each run's
config.json has settings.EXPERIMENT and settings.SEED, and all share SPLIT_SEED, so the runs of two experiments with
the same seed saw the same validation split (they are paired). Without seeds every experiment is a group of one.

    aggregate(collected_runs, MODES, baseline="E0") -> {baseline, seeded, groups [...], paired [...], notes [...]}

A statistic ("stat") is {mean, sd, ci95, n, seeds, values}: the mean over the seeds that have the number, the
Student t 95% interval of that mean (fplus.report.stats.mean_ci; None for n = 1), and the per-seed values. A
closed-loop success rate ("rate stat") is the mean of the per-seed rates with the t interval, clipped to [0, 1],
plus the pooled episodes (successes, episodes, pooled_rate, pooled_ci95: Wilson over all seeds' episodes), which
the tables show in parentheses: the seed is the unit of replication (docs/report.md, "Seeds").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from fplus.report.stats import mean_ci, wilson

Record = dict[str, Any]
DEFAULT_BASELINE = "E0"
OFFLINE_KEYS = ("mse_norm", "mse_raw", "delta_norm", "delta_raw")
LATENCY_KEYS = ("boundary", "within", "ratio", "idle_per_episode")


def _dig(obj: Any, *keys: str) -> Any:
    """obj[k1][k2]...; None when a level is missing or None (the report's numbers are optional by design)."""
    for key in keys:
        if not isinstance(obj, dict) or obj.get(key) is None:
            return None
        obj = obj[key]
    return obj


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _ordered(names, order: Sequence[str]) -> list[str]:
    names = set(names)
    return [m for m in order if m in names] + sorted(names - set(order))


def stat(runs: list[Record], get: Callable[[Record], Any], bounds: tuple[float, float] | None = None) -> Record | None:
    """The statistic of get(run) over `runs` (those where it is a number), or None when no run has it."""
    pairs = [(r["seed"], v) for r in runs if (v := _number(get(r))) is not None]
    if not pairs:
        return None
    values = [v for _, v in pairs]
    return {**mean_ci(values, bounds), "seeds": [s for s, _ in pairs], "values": values}


def rate_stat(runs: list[Record], cell_of: Callable[[Record], Record | None]) -> Record | None:
    """The statistic of the success rate of cell_of(run) (a closed-loop cell {successes, episodes, rate, ci95}):
    mean of the per-seed rates, t interval clipped to [0, 1], and the pooled episodes with their Wilson interval
    (None when a cell lacks its counts)."""
    out = stat(runs, lambda r: _dig(cell_of(r), "rate"), (0.0, 1.0))
    if out is None:
        return None
    cells = [c for r in runs if (c := cell_of(r)) is not None and _number(c.get("rate")) is not None]
    counts = [(c.get("successes"), c.get("episodes")) for c in cells]
    pooled: Record = {"successes": None, "episodes": None, "pooled_rate": None, "pooled_ci95": None}
    if all(isinstance(s, int) and isinstance(e, int) and e > 0 for s, e in counts):
        wins, episodes = sum(s for s, _ in counts), sum(e for _, e in counts)
        pooled = {"successes": wins, "episodes": episodes, "pooled_rate": wins / episodes,
                  "pooled_ci95": wilson(wins, episodes)}
    return {**out, **pooled}


# ----- groups ---------------------------------------------------------------------------------------------------

def group_runs(runs: list[Record]) -> tuple[list[Record], list[str]]:
    """([{label, experiment, runs (sorted by seed)}], notes): the runs of one experiment id form a group when their
    seeds (config.json settings.SEED) are known and distinct; otherwise (two runs with one seed: not replicates of
    each other) each of them is its own group, with a note. A run without an experiment id is its own group."""
    keyed: dict[tuple[str, str], list[Record]] = {}
    for run in runs:
        key = ("experiment", run["experiment"]) if run["experiment"] else ("run", run["label"])
        keyed.setdefault(key, []).append(run)
    groups, notes = [], []
    for (_, name), members in keyed.items():
        seeds = [r["seed"] for r in members]
        if len(members) > 1 and (None in seeds or len(set(seeds)) < len(seeds)):
            notes.append(f"{name}: the runs {', '.join(r['label'] for r in members)} do not have distinct seeds "
                         f"(config.json settings.SEED: {', '.join(str(s) for s in seeds)}); each is reported as its "
                         "own group")
            groups += [{"label": r["label"], "experiment": r["experiment"], "runs": [r]} for r in members]
        else:
            ordered = sorted(members, key=lambda r: (r["seed"] is None, r["seed"] if r["seed"] is not None else 0))
            groups.append({"label": name, "experiment": members[0]["experiment"], "runs": ordered})
    return groups, notes


def _seeds_text(seeds: list) -> str:
    return ", ".join("?" if s is None else str(s) for s in seeds)


def _coverage(label: str, what: str, runs: list[Record], step_of: Callable[[Record], Any],
              has: Callable[[Record], bool]) -> list[str]:
    """Notes on one source (the validation, the offline eval, a simulator) of a group's runs: seeds without it,
    seeds at different steps."""
    if len(runs) < 2 or not any(has(r) for r in runs):
        return []
    notes = []
    missing = [r["seed"] for r in runs if not has(r)]
    if missing:
        notes.append(f"no {what} for seed {_seeds_text(missing)}: its numbers are over the other seeds")
    steps = {r["seed"]: step_of(r) for r in runs if has(r)}
    if len(set(steps.values())) > 1:
        notes.append(f"the {what} of the seeds is of different steps ("
                     + ", ".join(f"seed {s}: {v}" for s, v in steps.items()) + ")")
    return [f"{label}: {n}" for n in notes]


def _world_stats(runs: list[Record], pick: Callable[[Record], Record | None]) -> Record | None:
    found = [w for r in runs if isinstance(w := pick(r), dict)]
    if not found:
        return None
    return {k: stat(runs, lambda r, k=k: _dig(pick(r), k)) for k in found[0] if k != "step"}


def _latency_stats(runs: list[Record], sim: str) -> list[Record]:
    """Per (chunking, inference delay) that any run has: the success rate stat and the action-change stats."""
    by_run = {r["label"]: {(row["chunking"], row["inference_delay"]): row
                           for row in _dig(r, "sim", sim, "latency") or []} for r in runs}
    keys = list(dict.fromkeys(k for mine in by_run.values() for k in mine))
    strategies = list(dict.fromkeys(k[0] for k in keys))
    out = []
    for key in sorted(keys, key=lambda k: (strategies.index(k[0]), k[1])):
        def row_of(r: Record, key=key) -> Record | None:
            return by_run[r["label"]].get(key)
        horizons = {row["execution_horizon"] for mine in by_run.values() if (row := mine.get(key))}
        out.append({"chunking": key[0], "inference_delay": key[1],
                    "execution_horizon": horizons.pop() if len(horizons) == 1 else None,
                    "rate": rate_stat(runs, row_of),
                    **{k: stat(runs, lambda r, k=k, f=row_of: _dig(f(r), k)) for k in LATENCY_KEYS}})
    return out


def _sim_stats(runs: list[Record], sim: str, modes: list[str], tasks: list[str]) -> Record:
    return {"steps": [_dig(r, "sim", sim, "step") for r in runs],
            "overall": {m: rate_stat(runs, lambda r, m=m: _dig(r, "sim", sim, "overall", m)) for m in modes},
            "tasks": {t: {m: rate_stat(runs, lambda r, m=m, t=t: _dig(r, "sim", sim, "tasks", t, m)) for m in modes}
                      for t in tasks},
            "latency": _latency_stats(runs, sim)}


def _eval_stats(runs: list[Record], section: str, keys: Sequence[str], order: Sequence[str], label: str,
                what: str, notes: list[str]) -> Record | None:
    """{steps, gate, modes {mode: {key: stat}}} of one evaluation section of the runs (`val_latest`: the last
    validation line, `offline`: the offline eval), None when no run has it; the seeds it misses go to `notes`."""
    if not any(r[section] for r in runs):
        return None
    modes = _ordered({m for r in runs for m in (_dig(r, section, "modes") or {})}, order)
    notes += _coverage(label, what, runs, lambda r: _dig(r, section, "step"), lambda r: r[section] is not None)
    return {"steps": [_dig(r, section, "step") for r in runs],
            "gate": stat(runs, lambda r: _dig(r, section, "gate")),
            "modes": {m: {k: stat(runs, lambda r, m=m, k=k: _dig(r, section, "modes", m, k)) for k in keys}
                      for m in modes}}


def aggregate_group(group: Record, order: Sequence[str]) -> Record:
    """Every number of the report over a group's runs (see the module docstring for a stat):

    {label, experiment, description, runs [labels], seeds, n, complete (runs complete), has_memory, has_prophet,
    final_train {term: stat}, final_gate stat, val_latest {steps, gate, modes {mode: {mse, delta}}} | None,
    world {validation, offline: {prophet, mean, copy, prophet_raw, mean_raw, copy_raw: stat} | None},
    offline {steps, gate, modes {mode: {mse_norm, mse_raw, delta_norm, delta_raw}}} | None,
    sim {simulator: {steps, overall {mode: rate stat}, tasks {task: {mode: rate stat}}, latency [{chunking,
    inference_delay, execution_horizon, rate, boundary, within, ratio, idle_per_episode}]}}, notes}.
    """
    runs, label = group["runs"], group["label"]
    notes: list[str] = []
    terms = [t for r in runs for t in r["final_train"]]
    out: Record = {
        "label": label, "experiment": group["experiment"], "description": runs[0]["description"],
        "runs": [r["label"] for r in runs], "seeds": [r["seed"] for r in runs], "n": len(runs),
        "complete": sum(bool(r["complete"]) for r in runs), "has_memory": any(r["has_memory"] for r in runs),
        "has_prophet": any(r["has_prophet"] for r in runs), "steps": [r["steps"] for r in runs],
        "final_train": {t: stat(runs, lambda r, t=t: r["final_train"].get(t)) for t in dict.fromkeys(terms)},
        "final_gate": stat(runs, lambda r: r["final_gate"]),
    }
    if len(runs) > 1 and out["complete"] < len(runs):
        notes.append(f"{label}: training not complete for seed "
                     + _seeds_text([r["seed"] for r in runs if not r["complete"]]))

    out["val_latest"] = _eval_stats(runs, "val_latest", ("mse", "delta"), order, label, "validation line", notes)
    out["world"] = {"validation": _world_stats(runs, lambda r: _dig(r, "world", "latest")),
                    "offline": _world_stats(runs, lambda r: _dig(r, "offline", "world"))}
    out["offline"] = _eval_stats(runs, "offline", OFFLINE_KEYS, order, label, "offline eval", notes)

    out["sim"] = {}
    for sim in sorted({s for r in runs for s in r["sim"]}):
        modes = _ordered({m for r in runs for m in (_dig(r, "sim", sim, "overall") or {})}, order)
        tasks = list(dict.fromkeys(t for r in runs for t in (_dig(r, "sim", sim, "tasks") or {})))
        out["sim"][sim] = _sim_stats(runs, sim, modes, tasks)
        notes += _coverage(label, f"{sim} evaluation", runs, lambda r, s=sim: _dig(r, "sim", s, "step"),
                           lambda r, s=sim: s in r["sim"])
    out["notes"] = notes
    return out


# ----- paired differences ---------------------------------------------------------------------------------------

def _paired_figures(a: Record, b: Record) -> list[tuple[str, str, str, Callable[[Record], Any]]]:
    """(key, figure, kind, get(run)) of the numbers both aggregates have; kind `mse` (lower is better), `cos`
    (higher), `rate` (higher; a difference of success rates)."""
    figures: list[tuple[str, str, str, Callable[[Record], Any]]] = []
    common = lambda x, y: [k for k in (x or {}) if k in (y or {})]  # noqa: E731
    for m in common(_dig(a, "val_latest", "modes"), _dig(b, "val_latest", "modes")):
        figures.append((f"val_latest.{m}.mse", f"validation MSE ({m})", "mse",
                        lambda r, m=m: _dig(r, "val_latest", "modes", m, "mse")))
    for m in common(_dig(a, "offline", "modes"), _dig(b, "offline", "modes")):
        for k, what in (("mse_norm", "normalised"), ("mse_raw", "raw")):
            figures.append((f"offline.{m}.{k}", f"offline MSE, {what} ({m})", "mse",
                            lambda r, m=m, k=k: _dig(r, "offline", "modes", m, k)))
    for source, path, what in (("validation", ("world", "latest"), "validation"),
                               ("offline", ("offline", "world"), "offline eval")):
        if a["world"][source] and b["world"][source]:
            figures.append((f"world.{source}.prophet", f"world cosine, Prophet ({what})", "cos",
                            lambda r, p=path: _dig(_dig(r, *p), "prophet")))
    if "l_action" in a["final_train"] and "l_action" in b["final_train"]:
        figures.append(("final_train.l_action", "final train l_action", "mse",
                        lambda r: r["final_train"].get("l_action")))
    for sim in common(a["sim"], b["sim"]):
        for m in common(a["sim"][sim]["overall"], b["sim"][sim]["overall"]):
            figures.append((f"sim.{sim}.overall.{m}", f"{sim} success ({m})", "rate",
                            lambda r, s=sim, m=m: _dig(r, "sim", s, "overall", m, "rate")))
        theirs = {(row["chunking"], row["inference_delay"]) for row in b["sim"][sim]["latency"]}
        for row in a["sim"][sim]["latency"]:
            key = (row["chunking"], row["inference_delay"])
            if key in theirs:
                figures.append((f"sim.{sim}.latency.{key[0]}.{key[1]}", f"{sim} success ({key[0]}, d = {key[1]})",
                                "rate", lambda r, s=sim, key=key: next(
                                    (x["rate"] for x in _dig(r, "sim", s, "latency") or []
                                     if (x["chunking"], x["inference_delay"]) == key), None)))
    return figures


def paired(group: Record, base: Record, aggregates: dict[str, Record]) -> Record:
    """The per-seed differences group - base of the numbers both have, over the seeds both have:

    {label ("E2 - E0"), experiment, baseline, seeds (common), only {group label: seeds, base label: seeds},
    rows [{key, figure, kind, seeds, values (per seed differences), mean, sd, ci95, n}], notes}.
    A difference of success rates has its interval clipped to [-1, 1].
    """
    mine = {r["seed"]: r for r in group["runs"] if r["seed"] is not None}
    theirs = {r["seed"]: r for r in base["runs"] if r["seed"] is not None}
    common = sorted(set(mine) & set(theirs))
    notes = []
    for s in common:
        for key in ("split_seed", "dataset"):
            if mine[s][key] != theirs[s][key]:
                notes.append(f"seed {s}: {mine[s]['label']} and {theirs[s]['label']} differ in "
                             f"{'SPLIT_SEED' if key == 'split_seed' else 'DATASET'} ({mine[s][key]} vs "
                             f"{theirs[s][key]}): not evaluated on the same validation split")
    rows = []
    for key, figure, kind, get in _paired_figures(aggregates[group["label"]], aggregates[base["label"]]):
        pairs = [(s, a - b) for s in common if (a := _number(get(mine[s]))) is not None
                 and (b := _number(get(theirs[s]))) is not None]
        if not pairs:
            continue
        values = [d for _, d in pairs]
        rows.append({"key": key, "figure": figure, "kind": kind, "seeds": [s for s, _ in pairs], "values": values,
                     **mean_ci(values, (-1.0, 1.0) if kind == "rate" else None)})
    return {"label": f"{group['label']} - {base['label']}", "experiment": group["label"], "baseline": base["label"],
            "seeds": common, "only": {group["label"]: sorted(set(mine) - set(theirs)),
                                      base["label"]: sorted(set(theirs) - set(mine))},
            "rows": rows, "notes": notes}


def aggregate(runs: list[Record], order: Sequence[str], baseline: str = DEFAULT_BASELINE) -> Record:
    """The seed section of report.json: {baseline, seeded (some group has more than one run), groups [see
    `aggregate_group`], paired [see `paired`: every group but the baseline's, when the baseline experiment has one
    group], notes}. `order`: the corruption modes in display order."""
    groups, notes = group_runs(runs)
    aggregates = {g["label"]: aggregate_group(g, order) for g in groups}
    bases = [g for g in groups if g["experiment"] == baseline]
    seeded = any(len(g["runs"]) > 1 for g in groups)
    pairs = []
    if len(bases) == 1:
        pairs = [paired(g, bases[0], aggregates) for g in groups if g is not bases[0]]
    elif seeded and len(groups) > 1:
        notes.append(f"no paired comparison: the baseline {baseline} has "
                     + ("no runs" if not bases else "runs without distinct seeds"))
    return {"baseline": baseline, "seeded": seeded, "groups": list(aggregates.values()), "paired": pairs,
            "notes": notes}


# ----- learning curves ------------------------------------------------------------------------------------------

def curve(lines: list[Record], key: str) -> list[tuple[int, float]]:
    """[(step, value)] of the metrics lines that have `key` (a loss term, `gate`, `val_mse_none`, ...)."""
    return [(int(r["step"]), float(r[key])) for r in lines if _number(r.get(key)) is not None]


def curve_band(curves: list[list[tuple[int, float]]]) -> Record | None:
    """The mean curve over runs with its min-max band: {steps, mean, lo, hi, n} at the steps every run with points
    logged (a seed that stopped early ends the band there); runs without a point are left out (n counts the
    others); None when no run has a point."""
    found = [dict(c) for c in curves if c]
    if not found:
        return None
    steps = sorted(set.intersection(*(set(c) for c in found)))
    return {"steps": steps, "mean": [math.fsum(c[s] for c in found) / len(found) for s in steps],
            "lo": [min(c[s] for c in found) for s in steps], "hi": [max(c[s] for c in found) for s in steps],
            "n": len(found)}
