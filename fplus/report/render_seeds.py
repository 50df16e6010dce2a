"""The report's "Across seeds" section: per experiment the mean over seeds, the 95% interval and n of the numbers
the per-run sections show, and the paired differences against the baseline (fplus.report.seeds builds the numbers;
this module only turns them into blocks of fplus.report.render). Empty when every experiment has one run: the
report then reads as without seeds.

A cell reads `mean [lo, hi]` (Student t 95% interval over seeds; no interval with one seed), with `(n=2)` when
fewer seeds than the experiment has contribute; closed-loop cells read `mean% [lo, hi] (pooled successes/episodes)`.
A difference is coloured only when its interval excludes 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fplus.report.render import NA, NOT_APPLICABLE, Block, Bullets, Cell, Figure, Heading, Para, Table

Record = dict[str, Any]


@dataclass
class SeedPlots:
    """The figures of the seed section (None where there was nothing to draw)."""

    losses: Path | None = None
    gate: Path | None = None
    world_cosine: Path | None = None
    success: dict[str, Path] = field(default_factory=dict)
    latency: dict[str, Path] = field(default_factory=dict)


# ----- statistics -> text ---------------------------------------------------------------------------------------

def _n_suffix(stat: Record, n_group: int | None) -> str:
    return f" (n={stat['n']})" if n_group is not None and stat["n"] < n_group else ""


def _mean_interval(stat: Record, spec: str, scale: float = 1.0, unit: str = "") -> str:
    """`mean [lo, hi]` (each times `scale`, formatted with `spec`; `unit` after the mean), or the mean alone
    without an interval (one seed)."""
    text = f"{scale * stat['mean']:{spec}}{unit}"
    if stat["ci95"] is not None:
        lo, hi = stat["ci95"]
        text += f" [{scale * lo:{spec}}, {scale * hi:{spec}}]"
    return text


def stat_cell(stat: Record | None, n_group: int | None = None, missing: str = NA, spec: str = ".4g") -> Cell:
    """`mean [lo, hi]` of a statistic (fplus.report.seeds.stat); `(n=k)` when k < n_group seeds contribute."""
    if stat is None:
        return Cell(missing, "na")
    return Cell(_mean_interval(stat, spec) + _n_suffix(stat, n_group))


def _significance(stat: Record, higher_is_better: bool) -> str:
    """worse / better when the interval excludes 0 (with one seed: the sign), else num."""
    lo, hi = stat["ci95"] if stat["ci95"] is not None else (stat["mean"], stat["mean"])
    if lo > 0 or hi < 0:
        up = lo > 0
        return "better" if up == higher_is_better else "worse"
    return "num"


def delta_cell(stat: Record | None, n_group: int | None = None, missing: str = NA, higher_is_better: bool = False,
               scale: float = 1.0, spec: str = "+.3g", unit: str = "") -> Cell:
    """A difference: `+mean [+lo, +hi]` (times `scale`, then `unit`), coloured when its interval excludes 0."""
    if stat is None:
        return Cell(missing, "na")
    return Cell(_mean_interval(stat, spec, scale, unit) + _n_suffix(stat, n_group),
                _significance(stat, higher_is_better))


def rate_cell(stat: Record | None, n_group: int | None = None, missing: str = NA) -> Cell:
    """A success rate over seeds: `50% [33, 67] (45/90)`: mean of the per-seed rates, t interval, pooled counts."""
    if stat is None:
        return Cell(missing, "na")
    text = _mean_interval(stat, ".0f", 100, "%")
    if stat.get("episodes"):
        text += f" ({stat['successes']}/{stat['episodes']})"
    return Cell(text + _n_suffix(stat, n_group))


def _seeds_text(seeds: list) -> str:
    return ", ".join("?" if s is None else str(s) for s in seeds)


def _steps_text(steps: list) -> str:
    found = sorted({s for s in steps if s is not None})
    if not found:
        return ""
    return f", step {found[0]}" if len(found) == 1 else f", steps {found[0]}-{found[-1]}"


# ----- tables ---------------------------------------------------------------------------------------------------

def groups_table(seeds: Record, terms: list[str]) -> Table:
    rows = []
    for g in seeds["groups"]:
        n = g["n"]
        row = [Cell(g["label"], "text"), Cell(g["description"] or "", "text"), Cell(_seeds_text(g["seeds"])),
               Cell(f"{g['complete']}/{n}")]
        missing = NA if not g["final_train"] else NOT_APPLICABLE
        row += [stat_cell(g["final_train"].get(t), n, missing) for t in terms]
        row.append(stat_cell(g["final_gate"], n, missing, "+.4f"))
        rows.append(row)
    return Table(["experiment", "description", "seeds", "complete", *terms, "gate"], rows,
                 caption="Mean over seeds [95% interval] of the final train losses and gate (last logged step).")


def _side_by_side(groups: list[Record], modes: list[str], pick: Callable[[Record], Record | None], value_key: str,
                  delta_key: str, caption: str) -> Table:
    head, header = [("", 1)], ["corruption"]
    for g in groups:
        block = pick(g)
        head.append((f"{g['label']} (n={g['n']}{_steps_text(block['steps']) if block else ''})", 2))
        header += ["MSE", "Δ vs none"]
    rows = []
    for mode in modes:
        row = [Cell(mode, "text")]
        for g in groups:
            block = pick(g)
            if mode != "none" and not g["has_memory"]:
                row += [Cell(NOT_APPLICABLE, "na"), Cell(NOT_APPLICABLE, "na")]
            elif block is None or mode not in block["modes"]:
                row += [Cell(NA, "na"), Cell(NA, "na")]
            else:
                m = block["modes"][mode]
                row += [stat_cell(m[value_key], g["n"]),
                        Cell("", "na") if mode == "none" else delta_cell(m[delta_key], g["n"])]
        rows.append(row)
    return Table(header, rows, groups=head, caption=caption)


def world_table(groups: list[Record]) -> Table | None:
    rows = []
    for g in groups:
        if not g["has_prophet"]:
            continue
        for source, where in (("validation", "validation"), ("offline", "offline eval")):
            w = g["world"][source]
            if w is None and source == "offline":
                continue
            row = [Cell(g["label"], "text"), Cell(where, "text")]
            for suffix, spec in (("", ".4g"), ("_raw", ".5f")):
                cells = [stat_cell(None if w is None else w.get(k + suffix), g["n"], spec=spec)
                         for k in ("prophet", "mean", "copy")]
                prophet, copy = (None if w is None else w.get(k + suffix) for k in ("prophet", "copy"))
                if prophet is not None and copy is not None:
                    cells[0].style = "better" if prophet["mean"] > copy["mean"] else "worse"
                row += cells
            rows.append(row)
    if not rows:
        return None
    return Table(["experiment", "from", "Prophet", "training mean", "copy-last", "Prophet", "training mean",
                  "copy-last"], rows, groups=[("", 2), ("standardised", 3), ("raw", 3)],
                 caption="Mean over seeds [95% interval] of cos(z_pred, z_future): latest val line and offline eval.")


def sim_tables(groups: list[Record], simulator: str) -> list[Block]:
    have = [g for g in groups if simulator in g["sim"]]
    modes: list[str] = []
    for g in have:
        modes += [m for m in g["sim"][simulator]["overall"] if m not in modes]

    def rate(g: Record, per: Record, mode: str) -> Cell:
        if mode != "none" and not g["has_memory"]:
            return Cell(NOT_APPLICABLE, "na")
        return rate_cell(per.get(mode), g["n"])

    rows = [[Cell(g["label"], "text"), Cell(str(g["n"])), *(rate(g, g["sim"][simulator]["overall"], m) for m in modes)]
            for g in have]
    blocks: list[Block] = [Table(["experiment", "seeds", *modes], rows, caption="success rate over seeds: mean of "
                                 "the per-seed rates [95% t interval] (pooled successes/episodes), all tasks")]
    for g in have:
        sim = g["sim"][simulator]
        rows = [[Cell(task, "text"), *(rate(g, per, m) for m in modes)] for task, per in sim["tasks"].items()]
        rows.append([Cell("overall", "text"), *(rate(g, sim["overall"], m) for m in modes)])
        blocks.append(Table(["task", *modes], rows, caption=f"{g['label']} per task, mean over seeds "
                            f"{_seeds_text(g['seeds'])}{_steps_text(sim['steps'])}"))
        if sim["latency"]:
            rows = [[Cell(row["chunking"], "text"), Cell(str(row["inference_delay"])), rate_cell(row["rate"], g["n"]),
                     *(stat_cell(row[k], g["n"]) for k in ("boundary", "within", "ratio", "idle_per_episode"))]
                    for row in sim["latency"]]
            blocks.append(Table(["chunking", "delay d", "success", "Δa boundary", "Δa within", "boundary / within",
                                 "idle steps / episode"], rows,
                                caption=f"{g['label']}: inference delay and chunking, all tasks, mean over seeds"))
    return blocks


def _diff_cell(kind: str, value: float) -> Cell:
    if kind == "rate":
        return Cell(f"{100 * value:+.1f} pp")
    return Cell(f"{value:+.4g}")


def paired_blocks(pair: Record) -> list[Block]:
    """The table "E2 - E0 (paired over seeds)": a row per number both have, the per-seed differences, their mean
    and t interval; the caption says which seeds were paired and which were not."""
    blocks: list[Block] = [Heading(3, f"{pair['label']} (paired over seeds)")]
    only = [f"seed {_seeds_text(seeds)} only in {label}" for label, seeds in pair["only"].items() if seeds]
    unpaired = f" Not paired: {'; '.join(only)}." if only else ""
    if not pair["rows"]:
        blocks.append(Para(f"{pair['label']}: {NA} (no number both have for a common seed).{unpaired}", note=True))
        return blocks
    seeds = pair["seeds"]
    rows = []
    for row in pair["rows"]:
        per_seed = dict(zip(row["seeds"], row["values"], strict=True))
        higher = row["kind"] in ("rate", "cos")
        scale, spec, unit = (100.0, "+.1f", " pp") if row["kind"] == "rate" else (1.0, "+.4g", "")
        interval = Cell(NA, "na") if row["ci95"] is None else \
            Cell(f"[{scale * row['ci95'][0]:{spec}}, {scale * row['ci95'][1]:{spec}}]{unit}")
        rows.append([Cell(row["figure"], "text"),
                     *(_diff_cell(row["kind"], per_seed[s]) if s in per_seed else Cell(NA, "na") for s in seeds),
                     Cell(f"{scale * row['mean']:{spec}}{unit}", _significance(row, higher)),
                     interval, Cell(str(row["n"]))])
    caption = (f"{pair['experiment']} minus {pair['baseline']}, seed by seed (same seed, same validation split); "
               f"mean and Student t 95% interval over the seeds both have ({_seeds_text(seeds)}); success in "
               f"percentage points.{unpaired}")
    blocks.append(Table(["figure", *(f"seed {s}" for s in seeds), "mean", "95% interval", "n"], rows,
                        caption=caption))
    if pair["notes"]:
        blocks.append(Para("; ".join(pair["notes"]) + ".", note=True))
    return blocks


# ----- the section ----------------------------------------------------------------------------------------------

def seed_section(data: Record, plots: SeedPlots) -> list[Block]:
    """The "Across seeds" section, or [] when no experiment has more than one run."""
    seeds = data["seeds"]
    if not seeds["seeded"]:
        return []
    groups = seeds["groups"]
    doc: list[Block] = [
        Heading(2, "Across seeds"),
        Para("Runs grouped by experiment (config.json `EXPERIMENT`), one run per training seed (`SEED`; every seed "
             "uses the same train/validation split, `SPLIT_SEED`). Each number is the mean over the seeds that have "
             "it, with its 95% interval mean ± t(0.975, n-1)·s/√n (s: the standard deviation over seeds); no "
             "interval with one seed. Closed-loop success: the mean of the per-seed success rates with the same t "
             "interval (clipped to [0, 100%]), the pooled successes/episodes in parentheses. The per-run numbers "
             "follow in the sections below."),
        groups_table(seeds, data["loss_terms"]),
    ]
    if plots.losses:
        doc.append(Figure(plots.losses, "loss curves over seeds", "Training loss terms and the validation action MSE: "
                          "per experiment the mean over seeds (line) and the min-max band over seeds (shaded), at "
                          "the steps every seed logged."))
    if plots.gate:
        doc.append(Figure(plots.gate, "gate over steps over seeds", "tanh(gate): mean over seeds and min-max band."))
    doc.append(Heading(3, "Action error under corruption, over seeds"))
    doc.append(_side_by_side(groups, data["modes"], lambda g: g["val_latest"], "mse", "delta",
                             "Validation (latest val line), normalised action MSE: mean over seeds [95% interval]."))
    if any(g["offline"] for g in groups):
        doc.append(_side_by_side(groups, data["modes"], lambda g: g["offline"], "mse_norm", "delta_norm",
                                 "Offline eval, normalised MSE: mean over seeds [95% interval]."))
        doc.append(_side_by_side(groups, data["modes"], lambda g: g["offline"], "mse_raw", "delta_raw",
                                 "Offline eval, raw action units: mean over seeds [95% interval]."))
    world = world_table(groups)
    if world is not None:
        doc += [Heading(3, "World prediction, over seeds"), world]
        if plots.world_cosine:
            doc.append(Figure(plots.world_cosine, "world cosine over seeds", "Validation cos(z_pred, z_future) "
                              "(standardised): mean over seeds and min-max band, Prophet and baselines."))
    for sim in sorted({s for g in groups for s in g["sim"]}):
        doc.append(Heading(3, f"{sim}: closed-loop success, over seeds"))
        if sim in plots.success:
            doc.append(Figure(plots.success[sim], f"{sim} success over seeds", "Mean over seeds of the overall "
                              "success rate per mode; error bars: 95% t interval over seeds."))
        doc += sim_tables(groups, sim)
        if sim in plots.latency:
            doc.append(Figure(plots.latency[sim], f"{sim} latency over seeds", "Mean over seeds of the success rate "
                              "(95% t interval) and of the action change against the inference delay."))
    for pair in seeds["paired"]:
        doc += paired_blocks(pair)
    notes = seeds["notes"] + [n for g in groups for n in g["notes"]]
    if notes:
        doc.append(Bullets(notes))
    return doc
