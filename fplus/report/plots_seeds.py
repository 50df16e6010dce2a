"""The figures of the report's seed section: learning curves per experiment as the mean over seeds with a min-max
band (fplus.report.seeds.curve_band), and the closed-loop figures of fplus.report.plots drawn from the means over
seeds (error bars: the 95% t interval over seeds). matplotlib is imported inside fplus.report.plots' helpers.

`groups` are report.json's seeds.groups; `runs` maps a run label to its collected run; `series` a run label to its
(train lines, val lines).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fplus.report import plots as p
from fplus.report.seeds import curve, curve_band

Record = dict[str, Any]
Series = dict[str, tuple[list[Record], list[Record]]]
BAND_ALPHA = 0.2


def _band(ax, band: Record, color, label: str, ls: str = "-") -> list[float]:
    """The mean line, and the min-max band when more than one seed has the curve; the values drawn."""
    ax.plot(band["steps"], band["mean"], color=color, ls=ls, lw=1.5, label=label,
            marker="o" if len(band["steps"]) < 15 else None, ms=3)
    if band["n"] > 1:
        ax.fill_between(band["steps"], band["lo"], band["hi"], color=color, alpha=BAND_ALPHA, lw=0)
    return [*band["lo"], *band["hi"]]


def group_band(group: Record, series: Series, key: str, val: bool = False) -> Record | None:
    """The band of metrics key `key` (a train-line term, or a val-line key with val=True) over a group's runs."""
    return curve_band([curve(series[label][1 if val else 0], key) for label in group["runs"]])


def _label(group: Record, band: Record) -> str:
    return f"{group['label']} (n={band['n']})"


def loss_bands(groups: list[Record], series: Series, terms: list[str], path: Path) -> Path | None:
    """One panel per loss term (and the validation MSE under `none`), per experiment the mean over seeds with the
    min-max band."""
    panels = []
    for term in [*terms, "val_mse_none"]:
        bands = [(i, g, b) for i, g in enumerate(groups) if (b := group_band(g, series, term, term == "val_mse_none"))
                 and b["steps"]]
        if bands:
            panels.append((term, bands))
    if not panels:
        return None
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = p._figure(4.4 * ncols, 3.1 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    legend: dict = {}
    for ax, (term, bands) in zip(axes, panels, strict=False):
        values: list[float] = []
        for i, group, band in bands:
            values += _band(ax, band, p.run_color(i), _label(group, band))
        if p._log_sensible(values):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(p._plain)
            ax.yaxis.set_minor_formatter(p._plain_minor if max(values) / min(values) < 30 else lambda _v, _p: "")
        ax.set_title(p.TERM_TITLES.get(term, term), fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3, which="both")
        handles, labels = ax.get_legend_handles_labels()
        legend.update({k: v for k, v in zip(labels, handles, strict=True) if k not in legend})
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.legend(list(legend.values()), list(legend.keys()), loc="outside upper center", ncols=len(legend), fontsize=9,
               frameon=False, title="mean over seeds, min-max band", title_fontsize=8)
    return p._save(fig, path)


def gate_bands(groups: list[Record], series: Series, path: Path) -> Path | None:
    """tanh(gate) over training steps per experiment with a gate: mean over seeds and min-max band."""
    bands = [(i, g, b) for i, g in enumerate(groups) if (b := group_band(g, series, "gate")) and b["steps"]]
    if not bands:
        return None
    fig = p._figure(7.5, 3.4)
    ax = fig.subplots()
    for i, group, band in bands:
        _band(ax, band, p.run_color(i), _label(group, band))
    p.gate_axes(ax, "injection gate over training (mean over seeds, min-max band)")
    return p._save(fig, path)


def world_bands(groups: list[Record], runs: dict[str, Record], path: Path) -> Path | None:
    """One panel per experiment with world cosines: the Prophet, training-mean and copy-last validation cosines
    (standardised) over steps, mean over seeds with the min-max band."""
    usable = []
    for group in groups:
        bands = {k: b for k in p.WORLD_LINES if (b := curve_band([
            [(h["step"], h[k]) for h in runs[label]["world"]["history"] if h[k] is not None]
            for label in group["runs"]])) and b["steps"]}
        if bands:
            usable.append((group, bands))
    if not usable:
        return None
    fig = p._figure(4.6 * len(usable) + 1.6, 3.5)
    axes = fig.subplots(1, len(usable), squeeze=False, sharey=True).ravel()
    for ax, (group, bands) in zip(axes, usable, strict=True):
        for key, band in bands.items():
            label, color, style = p.WORLD_LINES[key]
            _band(ax, band, color, label, style)
        n = max(b["n"] for b in bands.values())
        ax.set_title(f"{group['label']} (n={n}): world cosine (validation, standardised)", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cos(prediction, true future)")
    p._shared_legend(fig, axes)
    return p._save(fig, path)


def _interval(stat: Record | None) -> Record | None:
    return None if stat is None else {"rate": stat["mean"], "ci95": stat["ci95"]}


def _as_runs(groups: list[Record], simulator: str) -> list[Record]:
    """The groups as the runs fplus.report.plots draws: rate = the mean over seeds, ci95 = its t interval."""
    out = []
    for g in groups:
        if simulator not in g["sim"]:
            continue
        sim = g["sim"][simulator]
        latency = [{"chunking": row["chunking"], "inference_delay": row["inference_delay"],
                    "execution_horizon": row["execution_horizon"], **_interval(row["rate"]),
                    "boundary": None if row["boundary"] is None else row["boundary"]["mean"],
                    "within": None if row["within"] is None else row["within"]["mean"]}
                   for row in sim["latency"] if row["rate"] is not None]
        overall = {m: cell for m, s in sim["overall"].items() if (cell := _interval(s)) is not None}
        out.append({"label": g["label"], "sim": {simulator: {"overall": overall, "latency": latency}}})
    return out


def success_bars(groups: list[Record], simulator: str, path: Path) -> Path | None:
    """fplus.report.plots.success_bars of the means over seeds (error bars: 95% t interval over seeds)."""
    return p.success_bars(_as_runs(groups, simulator), simulator, path)


def latency_curves(groups: list[Record], simulator: str, path: Path) -> Path | None:
    """fplus.report.plots.latency_curves of the means over seeds (error bars: 95% t interval over seeds)."""
    return p.latency_curves(_as_runs(groups, simulator), simulator, path)
