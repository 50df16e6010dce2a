"""`fplus report`: tables and plots comparing runs (DESIGN 1, 6).

    write_report([OUTPUT_DIR/E0, OUTPUT_DIR/E2, OUTPUT_DIR/E4], OUTPUT_DIR/report)
    write_report([OUTPUT_DIR/E0-seed0, OUTPUT_DIR/E0-seed1, OUTPUT_DIR/E2-seed0, ...], OUTPUT_DIR/report)

writes into the output directory

    report.json   the collected numbers (fplus.report.collect): scripts and tests read this
    report.md     Markdown; figures referenced by relative path (plots/*.png)
    report.html   one self-contained file: inline CSS, figures embedded as base64 PNGs
    plots/        losses.png, gate.png, delta_vs_gate.png, world_cosine.png, success-<simulator>.png,
                  latency-<simulator>.png, and with seeds seeds-success-<simulator>.png,
                  seeds-latency-<simulator>.png (those with data)

With several seeds of an experiment (fplus.report.seeds) the report adds an "Across seeds" section (means, 95%
intervals, paired differences against the baseline) and losses.png, gate.png and world_cosine.png show the mean
over seeds with a min-max band instead of one line per run.

Missing pieces (no eval yet, an unfinished run) appear as "n/a" with a note; parts a run does not have (a gate, a
world loss, the memory modes of a run without an injected memory) as "-". A path that is not a run directory is an
FplusError. Without matplotlib (the `report` extra) the tables are still written, with a note.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from fplus.report import collect as c
from fplus.report import plots as p
from fplus.report import plots_seeds as ps
from fplus.report.render import Plots, build_document, to_html, to_markdown
from fplus.report.render_seeds import SeedPlots, seed_section
from fplus.report.seeds import DEFAULT_BASELINE

PLOTS_DIR = "plots"
PLOT_NAMES = ("losses.png", "gate.png", "delta_vs_gate.png", "world_cosine.png")


@dataclass
class ReportFiles:
    """What `write_report` wrote."""

    out: Path
    markdown: Path
    html: Path
    json: Path
    plots: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Per-run notes about missing pieces, "label: note" each."""


def _matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def make_plots(data: dict, out: Path) -> tuple[Plots, SeedPlots]:
    """Write every figure there is data for into out/plots/ (and remove stale ones from an earlier report): the
    per-run figures, and with seeds the seed section's (its curves replace the per-run losses, gate and world
    cosine figures)."""
    plot_dir = out / PLOTS_DIR
    if plot_dir.is_dir():
        for old in [*(plot_dir / n for n in PLOT_NAMES), *plot_dir.glob("success-*.png"),
                    *plot_dir.glob("latency-*.png"), *plot_dir.glob("seeds-*.png")]:
            old.unlink(missing_ok=True)
    runs = data["runs"]
    series = {r["label"]: c.train_series(Path(r["path"])) for r in runs}
    if data["seeds"]["seeded"]:
        groups = data["seeds"]["groups"]
        seeded = SeedPlots(losses=ps.loss_bands(groups, series, data["loss_terms"], plot_dir / "losses.png"),
                           gate=ps.gate_bands(groups, series, plot_dir / "gate.png"),
                           world_cosine=ps.world_bands(groups, {r["label"]: r for r in runs},
                                                       plot_dir / "world_cosine.png"))
        for sim in sorted({s for g in groups for s in g["sim"]}):
            if (path := ps.success_bars(groups, sim, plot_dir / f"seeds-success-{sim}.png")) is not None:
                seeded.success[sim] = path
            if (path := ps.latency_curves(groups, sim, plot_dir / f"seeds-latency-{sim}.png")) is not None:
                seeded.latency[sim] = path
        plots = Plots(delta_vs_gate=p.delta_vs_gate(runs, plot_dir / "delta_vs_gate.png"))
    else:
        seeded = SeedPlots()
        plots = _run_plots(runs, series, data["loss_terms"], plot_dir)
    for sim in sorted({s for r in runs for s in r["sim"]}):
        path = p.success_bars(runs, sim, plot_dir / f"success-{sim}.png")
        if path is not None:
            plots.success[sim] = path
        path = p.latency_curves(runs, sim, plot_dir / f"latency-{sim}.png")
        if path is not None:
            plots.latency[sim] = path
    return plots, seeded


def _run_plots(runs: list[dict], series: dict, terms: list[str], plot_dir: Path) -> Plots:
    """The per-run curves (one line per run): losses, gate, delta vs gate, world cosine."""
    return Plots(
        losses=p.loss_curves(runs, series, terms, plot_dir / "losses.png"),
        gate=p.gate_curves(runs, series, plot_dir / "gate.png"),
        delta_vs_gate=p.delta_vs_gate(runs, plot_dir / "delta_vs_gate.png"),
        world_cosine=p.world_cosine(runs, plot_dir / "world_cosine.png"),
    )


def write_report(runs: list[Path], out: Path, baseline: str = DEFAULT_BASELINE) -> ReportFiles:
    """Collect the numbers of `runs`, draw the figures and write report.json, report.md and report.html into `out`.
    `baseline`: the experiment the paired comparisons over seeds subtract (report.json seeds.paired).

    Raises FplusError when a path is not a run directory (before anything is written).
    """
    from fplus import __version__

    out = Path(out)
    data = c.collect([Path(r) for r in runs], baseline)
    data["generated"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    data["fplus_version"] = __version__
    data["notes"] = []
    out.mkdir(parents=True, exist_ok=True)
    if _matplotlib_available():
        plots, seeded = make_plots(data, out)
    else:
        plots, seeded = Plots(), SeedPlots()
        data["notes"].append("plots n/a: matplotlib is not installed (`pip install 'fplus[report]'`)")
    files = ReportFiles(out=out, markdown=out / "report.md", html=out / "report.html", json=out / "report.json")
    files.plots = [q for q in (plots.losses, plots.gate, plots.delta_vs_gate, plots.world_cosine,
                               *plots.success.values(), *plots.latency.values(), seeded.losses, seeded.gate,
                               seeded.world_cosine, *seeded.success.values(), *seeded.latency.values()) if q]
    data["plots"] = [q.relative_to(out).as_posix() for q in files.plots]
    doc = build_document(data, plots, seed_section(data, seeded))
    files.json.write_text(json.dumps(data, indent=2) + "\n")
    files.markdown.write_text(to_markdown(doc, out))
    files.html.write_text(to_html(doc))
    files.notes = [f"{r['label']}: {n}" for r in data["runs"] for n in r["notes"]] + data["notes"]
    if data["seeds"]["seeded"]:
        files.notes += data["seeds"]["notes"] + [n for g in data["seeds"]["groups"] for n in g["notes"]]
    return files
