"""The report's figures (PNG, matplotlib Agg canvas; matplotlib is imported inside the functions so that the CLI
starts fast and the rest of the report works without it).

Each function writes one PNG and returns its path, or None when no run has the numbers it needs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fplus.report.collect import delta_gate_points, latency_series, world_series

Record = dict[str, Any]

DPI = 110
TERM_TITLES = {
    "loss": "loss (total)",
    "l_action": "l_action (action MSE)",
    "l_world": "l_world (1 - cos)",
    "l_text": "l_text (CoC)",
    "l_align": "l_align (FLARE)",
    "val_mse_none": "validation action MSE (none)",
}
MODE_COLORS = {"none": "#7f7f7f", "zero": "#1f77b4", "random": "#ff7f0e", "shuffle": "#9467bd",
               "oracle": "#2ca02c", "history": "#8c564b"}
STRATEGY_COLORS = {"sync": "#7f7f7f", "naive": "#d62728", "rtc": "#1f77b4"}
"""Latency figure: one colour per chunking strategy."""
WORLD_LINES = {"prophet": ("Prophet", "#d62728", "-"), "mean": ("training mean", "#7f7f7f", ":"),
               "copy": ("copy-last (z_t repeated)", "#1f77b4", "--")}


def _figure(width: float, height: float):
    """A figure on the Agg canvas, without pyplot (no global state, no GUI backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path


def run_color(index: int) -> str:
    """The colour of the index-th run, the same in every figure."""
    from matplotlib import colormaps

    return colormaps["tab10"](index % 10)


def mode_color(mode: str, index: int) -> str:
    from matplotlib import colormaps

    return MODE_COLORS.get(mode, colormaps["Dark2"](index % 8))


def _plain(value: float, _pos=None) -> str:
    """Tick labels on log axes as plain numbers (0.2, not 2 x 10^-1)."""
    return f"{value:.2g}"


def _plain_minor(value: float, _pos=None) -> str:
    """Minor log ticks: label 2, 3 and 5 times a power of ten only, so that short ranges still read."""
    mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
    return f"{value:.2g}" if round(mantissa) in (2, 3, 5) else ""


def _log_sensible(values: list[float]) -> bool:
    """Log scale when every value is positive and they span at least a factor of 5."""
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 5


def loss_curves(runs: list[Record], series: dict[str, tuple[list[Record], list[Record]]], terms: list[str],
                path: Path) -> Path | None:
    """One panel per loss term (and the validation MSE without corruption), one line per run."""
    panels = [t for t in terms if any(r.get(t) is not None for train, _ in series.values() for r in train)]
    if any(r.get("val_mse_none") is not None for _, val in series.values() for r in val):
        panels.append("val_mse_none")
    if not panels:
        return None
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(4.4 * ncols, 3.1 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, term in zip(axes, panels, strict=False):
        values: list[float] = []
        for i, run in enumerate(runs):
            train, val = series[run["label"]]
            lines = val if term == "val_mse_none" else train
            pts = [(r["step"], float(r[term])) for r in lines if r.get(term) is not None]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            values += ys
            ax.plot(xs, ys, color=run_color(i), label=run["label"], lw=1.4,
                    marker="o" if term == "val_mse_none" or len(pts) < 15 else None, ms=3)
        if _log_sensible(values):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(_plain)
            if max(values) / min(values) < 30:  # under ~1.5 decades there are too few powers of ten to read
                ax.yaxis.set_minor_formatter(_plain_minor)
            else:
                ax.yaxis.set_minor_formatter(lambda _v, _pos: "")
        ax.set_title(TERM_TITLES.get(term, term), fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3, which="both")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    seen = dict(zip(labels, handles, strict=True))
    for ax in axes[1:len(panels)]:
        h, lab = ax.get_legend_handles_labels()
        seen.update({k: v for k, v in zip(lab, h, strict=True) if k not in seen})
    fig.legend(list(seen.values()), list(seen.keys()), loc="outside upper center", ncols=len(seen), fontsize=9,
               frameon=False)
    return _save(fig, path)


def gate_curves(runs: list[Record], series: dict[str, tuple[list[Record], list[Record]]], path: Path) -> Path | None:
    """tanh(gate) over training steps, one line per run that has an injection gate."""
    fig = _figure(7.5, 3.4)
    ax = fig.subplots()
    drawn = 0
    for i, run in enumerate(runs):
        train, _ = series[run["label"]]
        pts = [(r["step"], float(r["gate"])) for r in train if r.get("gate") is not None]
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, color=run_color(i), label=run["label"], lw=1.6)
        drawn += 1
    if not drawn:
        return None
    gate_axes(ax, "injection gate over training")
    return _save(fig, path)


def gate_axes(ax, title: str) -> None:
    """The gate plot's axes (zero line, labels, grid, legend): one look for the per-run and the seed plots."""
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("gate  tanh(g)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, frameon=False)


def _shared_legend(fig, axes, title: str | None = None) -> None:
    legend: dict = {}
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        legend.update({k: v for k, v in zip(labels, handles, strict=True) if k not in legend})
    fig.legend(list(legend.values()), list(legend.keys()), loc="outside right upper", fontsize=8, frameon=False,
               title=title, title_fontsize=8)


def delta_vs_gate(runs: list[Record], path: Path) -> Path | None:
    """One panel per run with an injected memory: at each validation line, x = gate, y = val MSE(mode) - val
    MSE(none), one line (with markers) per corruption mode, and the zero line. The points are
    `fplus.report.collect.delta_gate_points`."""
    usable = [(run, pts) for run in runs if (pts := delta_gate_points(run))]
    if not usable:
        return None
    fig = _figure(4.6 * len(usable) + 1.0, 3.7)
    axes = fig.subplots(1, len(usable), squeeze=False, sharey=True).ravel()
    for ax, (run, points) in zip(axes, usable, strict=True):
        for j, (mode, xy) in enumerate(points.items()):
            xs, ys = zip(*xy, strict=True)
            ax.plot(xs, ys, marker="o", ms=4, lw=1.2, color=mode_color(mode, j), label=mode)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(f"{run['label']}: corruption delta vs gate", fontsize=10)
        ax.set_xlabel("gate at the validation  tanh(g)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("val MSE(mode) - val MSE(none)")
    _shared_legend(fig, axes, "corruption")
    return _save(fig, path)


def world_cosine(runs: list[Record], path: Path) -> Path | None:
    """One panel per run with world cosines: the validation cos(z_pred, z_future) of the Prophet and of the two
    baselines (training mean, copy-last) over steps, in the standardised latent space. The points are
    `fplus.report.collect.world_series`."""
    usable = [(run, series) for run in runs if (series := world_series(run))]
    if not usable:
        return None
    fig = _figure(4.6 * len(usable) + 1.6, 3.5)
    axes = fig.subplots(1, len(usable), squeeze=False, sharey=True).ravel()
    for ax, (run, series) in zip(axes, usable, strict=True):
        for key, pts in series.items():
            label, color, style = WORLD_LINES[key]
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, ls=style, color=color, marker="o", ms=3, lw=1.4, label=label)
        ax.set_title(f"{run['label']}: world cosine (validation, standardised)", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cos(prediction, true future)")
    _shared_legend(fig, axes)
    return _save(fig, path)


def success_bars(runs: list[Record], simulator: str, path: Path) -> Path | None:
    """Overall closed-loop success rate per run (groups) and corruption mode (bars), with 95% interval bars."""
    rows = [(run, run["sim"][simulator]["overall"]) for run in runs if simulator in run["sim"]]
    if not rows:
        return None
    modes: list[str] = []
    for _, overall in rows:
        modes += [m for m in overall if m not in modes]
    width = 0.8 / len(modes)
    fig = _figure(max(5.0, 1.1 * len(rows) * len(modes) * 0.55 + 2), 3.6)
    ax = fig.subplots()
    for j, mode in enumerate(modes):
        xs, ys, lo, hi = [], [], [], []
        for i, (_, overall) in enumerate(rows):
            cell = overall.get(mode)
            if cell is None or cell["rate"] is None:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(cell["rate"])
            ci = cell["ci95"] or [cell["rate"], cell["rate"]]
            lo.append(max(0.0, cell["rate"] - ci[0]))
            hi.append(max(0.0, ci[1] - cell["rate"]))
        ax.bar(xs, ys, width * 0.92, color=mode_color(mode, j), label=mode, yerr=[lo, hi], capsize=3,
               error_kw={"lw": 1, "ecolor": "#333333"})
    ax.set_xticks(range(len(rows)), [run["label"] for run, _ in rows])
    ax.set_ylim(0, 1.05)
    ax.yaxis.set_major_formatter(lambda v, _pos: f"{100 * v:.0f}%")
    ax.set_ylabel("success rate")
    ax.set_title(f"{simulator}: closed-loop success (all tasks), 95% intervals", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=8, frameon=False,
               title="corruption", title_fontsize=8)
    return _save(fig, path)


def latency_curves(runs: list[Record], simulator: str, path: Path) -> Path | None:
    """Per run with latency results in `simulator` (one row of panels each): success rate (95% interval bars) and
    the mean action change at chunk boundaries (solid; within chunks: dotted) against the inference delay d, one
    line per chunking strategy. The points are `fplus.report.collect.latency_series`."""
    usable = [(run, series) for run in runs if simulator in run["sim"]
              and (series := latency_series(run["sim"][simulator]))]
    if not usable:
        return None
    fig = _figure(10.5, 3.3 * len(usable) + 0.5)
    axes = fig.subplots(len(usable), 2, squeeze=False)
    for (ax_rate, ax_jump), (run, series) in zip(axes, usable, strict=True):
        for j, (strategy, rows) in enumerate(series.items()):
            color = STRATEGY_COLORS.get(strategy, mode_color(strategy, j))
            dodge = 0.05 * (j - (len(series) - 1) / 2)  # so that the interval bars of equal delays stay apart
            xs = [r["inference_delay"] + dodge for r in rows]
            ys = [r["rate"] for r in rows]
            lo = [max(0.0, r["rate"] - (r["ci95"] or [r["rate"]] * 2)[0]) for r in rows]
            hi = [max(0.0, (r["ci95"] or [r["rate"]] * 2)[1] - r["rate"]) for r in rows]
            ax_rate.errorbar(xs, ys, yerr=[lo, hi], color=color, marker="o", ms=4, lw=1.4, capsize=3,
                             label=strategy)
            for key, style, suffix in (("boundary", "-", "at boundaries"), ("within", ":", "within chunks")):
                pts = [(r["inference_delay"], r[key]) for r in rows if r[key] is not None]
                if pts:
                    px, py = zip(*pts, strict=True)
                    ax_jump.plot(px, py, ls=style, color=color, marker="o" if style == "-" else None, ms=4, lw=1.4,
                                 label=f"{strategy} {suffix}")
        steps = {r["execution_horizon"] for rows in series.values() for r in rows} - {None}
        s_text = f", s = {steps.pop()}" if len(steps) == 1 else ""
        ax_rate.set_ylim(0, 1.05)
        ax_rate.yaxis.set_major_formatter(lambda v, _pos: f"{100 * v:.0f}%")
        ax_rate.set_ylabel("success rate")
        ax_rate.set_title(f"{run['label']}: success vs inference delay{s_text}", fontsize=10)
        ax_jump.set_ylabel("mean |a_t - a_(t-1)|")
        ax_jump.set_title(f"{run['label']}: action change vs inference delay", fontsize=10)
        for ax in (ax_rate, ax_jump):
            ax.set_xlabel("inference delay d (control steps)")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
    _shared_legend(fig, axes.ravel(), "chunking")
    return _save(fig, path)
