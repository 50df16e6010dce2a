"""The report as a document (headings, paragraphs, tables, figures), rendered to Markdown and self-contained HTML.

`build_document` decides what the report says from the collected numbers (`fplus.report.collect`); the two
renderers only decide how it looks. Markdown references the PNGs by relative path (plots/...), HTML embeds them
as base64 data URIs so that report.html is one file that can be mailed or attached on its own.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Record = dict[str, Any]

NA = "n/a"  # missing: not computed yet (no eval, no val line); a note says why
NOT_APPLICABLE = "-"  # the experiment has no such part (E0 has no gate, no world loss, no memory to corrupt)


@dataclass
class Cell:
    """A table cell: its text and a style (`num`, `na`, `worse`, `better`, `text`)."""

    text: str
    style: str = "num"


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    """A paragraph; `code` spans become <code> in HTML. `note` paragraphs are set smaller and muted."""

    text: str
    note: bool = False


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    """header: the column names; groups: optional (label, span) pairs above them (HTML colspan; in Markdown the
    group label prefixes the column names)."""

    header: list[str]
    rows: list[list[Cell]]
    groups: list[tuple[str, int]] | None = None
    caption: str = ""


@dataclass
class Figure:
    path: Path
    alt: str
    caption: str = ""


Block = Heading | Para | Bullets | Table | Figure


@dataclass
class Plots:
    """The PNGs written for the report (None where there was nothing to draw)."""

    losses: Path | None = None
    gate: Path | None = None
    delta_vs_gate: Path | None = None
    world_cosine: Path | None = None
    success: dict[str, Path] = field(default_factory=dict)
    latency: dict[str, Path] = field(default_factory=dict)


# ----- numbers -> text ------------------------------------------------------------------------------------------

def fmt(value: float | None, missing: str = NA) -> Cell:
    if value is None:
        return Cell(missing, "na")
    return Cell(f"{value:.4g}")


def fmt_raw_cos(value: float | None, missing: str = NA) -> Cell:
    """A cosine on raw latents, with five decimals (0.99986 vs 0.99995 must not both read 1)."""
    if value is None:
        return Cell(missing, "na")
    return Cell(f"{value:.5f}")


def fmt_delta(value: float | None, missing: str = NA) -> Cell:
    if value is None:
        return Cell(missing, "na")
    return Cell(f"{value:+.3g}", "worse" if value > 0 else "better" if value < 0 else "num")


def fmt_rate(cell: Record | None) -> Cell:
    if cell is None or cell.get("rate") is None:
        return Cell(NA, "na")
    text = f"{100 * cell['rate']:.0f}%"
    if cell.get("ci95"):
        lo, hi = cell["ci95"]
        text += f" [{100 * lo:.0f}, {100 * hi:.0f}]"
    if cell.get("episodes") is not None:
        text += f" ({cell['successes']}/{cell['episodes']})"
    return Cell(text)


def _steps(run: Record) -> Cell:
    if run["steps"] is None:
        return Cell(NA, "na")
    total = run["total_steps"]
    return Cell(f"{run['steps']}" + (f" / {total}" if total is not None else ""))


# ----- the document ---------------------------------------------------------------------------------------------

def runs_table(data: Record) -> Table:
    terms = data["loss_terms"]
    header = ["run", "experiment", "steps", "complete", *terms, "gate"]
    rows = []
    for run in data["runs"]:
        row = [Cell(run["label"], "text"), Cell(run["description"] or "", "text"), _steps(run),
               Cell("yes" if run["complete"] else "no", "text")]
        for t in terms:  # no train line at all: n/a; a term the experiment does not have: -
            row.append(fmt(run["final_train"].get(t), NA if not run["final_train"] else NOT_APPLICABLE))
        gate = run["final_gate"]
        row.append(fmt(gate, NA if not run["final_train"] else NOT_APPLICABLE) if gate is None
                   else Cell(f"{gate:+.4f}"))
        rows.append(row)
    return Table(header, rows, caption="Final train losses are those of the last logged step.")


def _side_by_side(data: Record, pick, value_key: str, delta_key: str, caption: str) -> list[Block]:
    """Rows: corruption modes; per run: value and delta vs `none`. pick(run) -> {mode: cell} or None.

    A run without an injected memory gets `NOT_APPLICABLE` in every memory mode; a run with one that lacks a mode
    (not evaluated) gets `NA`, with a note under the table."""
    runs = data["runs"]
    groups, header = [("", 1)], ["corruption"]
    for run in runs:
        block = pick(run)
        step = f" (step {block['step']})" if block and block.get("step") is not None else ""
        groups.append((f"{run['label']}{step}", 2))
        header += ["MSE", "Δ vs none"]
    rows = []
    unevaluated: dict[str, list[str]] = {}
    for mode in data["modes"]:
        row = [Cell(mode, "text")]
        for run in runs:
            block = pick(run)
            if mode != "none" and not run.get("has_memory", True):
                row += [Cell(NOT_APPLICABLE, "na"), Cell(NOT_APPLICABLE, "na")]
                continue
            if block is None:
                row += [Cell(NA, "na"), Cell(NA, "na")]
                continue
            m = block["modes"].get(mode)
            if m is None:
                row += [Cell(NA, "na"), Cell(NA, "na")]
                unevaluated.setdefault(run["label"], []).append(mode)
                continue
            row += [fmt(m[value_key]), Cell("", "na") if mode == "none" else fmt_delta(m[delta_key])]
        rows.append(row)
    blocks: list[Block] = [Table(header, rows, groups=groups, caption=caption)]
    if unevaluated:
        blocks.append(Para(f"{NA}: not evaluated in " + "; ".join(f"{label} ({', '.join(modes)})"
                                                             for label, modes in unevaluated.items()) + ".",
                           note=True))
    return blocks


def text_table(data: Record) -> list[Block]:
    """The CoC text loss on every validation sample beside its unigram baseline (latest val line), per run that
    logged it (CoC experiments); nothing when none did."""
    rows = []
    for run in data["runs"]:
        text = run.get("text")
        if text is None:
            continue
        first = fmt(text["l_text"])
        if text["unigram"] is not None:
            first.style = "better" if text["l_text"] < text["unigram"] else "worse"
        rows.append([Cell(run["label"], "text"), Cell(f"validation, step {text['step']}", "text"), first,
                     fmt(text["unigram"])])
    if not rows:
        return []
    return [Table(["run", "from", "L_text", "unigram baseline"], rows,
                  caption="CoC text loss (nats a token) over every labelled token of every validation sample's CoC "
                  "text (val_l_text), whatever COC_FRACTION trained on."),
            Para("The baseline needs no learning: it scores each label token by its frequency in the training "
                 "split's labels (add-one smoothed). An L_text above it has not learnt even which tokens the labels "
                 "use.")]


def world_table(data: Record) -> list[Block]:
    """The Prophet's cos(z_pred, z_future) beside the training-mean and copy-last baselines, standardised and raw,
    from the latest val line and from the offline eval, per run with a Prophet."""
    keys = ("prophet", "mean", "copy")
    rows = []
    for run in data["runs"]:
        if not run.get("has_prophet"):
            continue
        sources = [(f"validation, step {w['step']}", w) if (w := run["world"]["latest"]) else ("validation", None)]
        if run["offline"] is not None:
            sources.append((f"offline eval, step {run['offline']['step']}", run["offline"]["world"]))
        for where, w in sources:
            row = [Cell(run["label"], "text"), Cell(where, "text")]
            for suffix in ("", "_raw"):
                values = [None if w is None else w.get(k + suffix) for k in keys]
                prophet, copy = values[0], values[2]
                # raw cosines of near-constant latents all sit near 1: five decimals keep them apart
                f = fmt if suffix == "" else fmt_raw_cos
                first = f(prophet)
                if prophet is not None and copy is not None:
                    first.style = "better" if prophet > copy else "worse"
                row += [first, f(values[1]), f(values[2])]
            rows.append(row)
    if not rows:
        return [Para(f"World cosine: {NOT_APPLICABLE} (no run has a Prophet).", note=True)]
    header = ["run", "from", "Prophet", "training mean", "copy-last", "Prophet", "training mean", "copy-last"]
    groups = [("", 2), ("standardised", 3), ("raw", 3)]
    return [
        Table(header, rows, groups=groups, caption="cos(z_pred, z_future) averaged over the validation samples "
              "(latest val line of metrics.jsonl) and the offline eval (its `world`); standardised: the latent "
              "space the loss uses, raw: the encoder's own."),
        Para("The baselines need no learning: **training mean** always predicts the mean latent of the training "
             "split, **copy-last** predicts the present latent z_t for every future step (what the present alone "
             "gives). A Prophet that does not beat copy-last has learnt nothing beyond the present. In the raw "
             "encoder space near-constant latents make every cosine close to 1; the standardised space (per "
             "dimension, with the training split's statistics) is the one the loss uses."),
    ]


def _episodes(sim: Record) -> dict[str, int]:
    """Episodes per task of each mode that has results (from `collect_sim`)."""
    return {m: n for m, n in (sim.get("episodes_per_mode") or {}).items() if n}


def _episodes_text(episodes: dict[str, int]) -> str:
    return ", ".join(f"{m} {n}" for m, n in episodes.items())


def sim_tables(data: Record, simulator: str) -> list[Block]:
    """The all-tasks table (runs x modes) and one per-task table per run. Runs without an injected memory get
    `NOT_APPLICABLE` in the memory modes; when the modes of a run used different episode counts, the per-task
    headers say so ("zero (8 ep.)") and a line under the all-tasks table lists them."""
    runs = [r for r in data["runs"] if simulator in r["sim"]]
    modes: list[str] = []
    for r in runs:
        modes += [m for m in r["sim"][simulator]["overall"] if m not in modes]

    def rate(run: Record, per: Record, mode: str) -> Cell:
        if mode != "none" and not run.get("has_memory", True):
            return Cell(NOT_APPLICABLE, "na")
        return fmt_rate(per.get(mode))

    overall_rows = [[Cell(r["label"], "text"), Cell(str(r["sim"][simulator]["step"]))]
                    + [rate(r, r["sim"][simulator]["overall"], m) for m in modes] for r in runs]
    missing = [r["label"] for r in data["runs"] if simulator not in r["sim"]]
    blocks: list[Block] = [
        Heading(3, f"{simulator}: all tasks"),
        Table(["run", "step", *modes], overall_rows,
              caption="success rate [95% interval] (successes/episodes) per corruption mode"),
    ]
    unevaluated = [f"{r['label']} ({', '.join(gaps)})" for r in runs if r.get("has_memory", True)
                   and (gaps := [m for m in modes if m not in r["sim"][simulator]["overall"]])]
    if unevaluated:
        blocks.append(Para(f"{NA}: not evaluated in {'; '.join(unevaluated)}.", note=True))
    uneven = {r["label"]: eps for r in runs if len(set((eps := _episodes(r["sim"][simulator])).values())) > 1}
    if uneven:
        blocks.append(Para("Episodes per task differ between modes: " + "; ".join(
            f"{label}: {_episodes_text(eps)}" for label, eps in uneven.items()) + ".", note=True))
    if missing:
        blocks.append(Para(f"{NA} for {', '.join(missing)}: no {simulator} evaluation yet.", note=True))
    for r in runs:
        sim = r["sim"][simulator]
        rows = [[Cell(task, "text")] + [rate(r, per, m) for m in modes] for task, per in sim["tasks"].items()]
        rows.append([Cell("overall", "text")] + [rate(r, sim["overall"], m) for m in modes])
        episodes = _episodes(sim)
        suite = f" {sim['suite']}" if sim.get("suite") else ""
        if len(set(episodes.values())) > 1:
            header = [f"{m} ({episodes[m]} ep.)" if m in episodes else m for m in modes]
            counts = f"episodes per task: {_episodes_text(episodes)}, "
        else:
            header = list(modes)
            n = next(iter(episodes.values()), None) or sim["episodes_per_task"]
            counts = f"{n} episode{'s' if n != 1 else ''} per task and mode, " if n else ""
        notes = {f"{m} is not in the table: {c['note']}" for per in sim["tasks"].values() for m, c in per.items()
                 if c.get("note") and m not in modes}
        blocks += [Heading(3, f"{simulator}{suite}: {r['label']} per task"),
                   Table(["task", *header], rows, caption=counts + f"step {sim['step']}, `{sim['file']}`")]
        if notes:
            blocks.append(Para("; ".join(sorted(notes)) + ".", note=True))
    return blocks


def latency_tables(data: Record, simulator: str, figure: Path | None = None) -> list[Block]:
    """The latency-aware closed loop of `simulator`: per run with a `latency` section, a row per chunking strategy
    and inference delay (success over all tasks, mean action change at chunk boundaries and within chunks, their
    ratio, idle steps per episode); [] when no run has one."""
    runs = [r for r in data["runs"] if simulator in r["sim"] and r["sim"][simulator].get("latency")]
    if not runs:
        return []
    blocks: list[Block] = [
        Heading(3, f"{simulator}: inference delay and chunking"),
        Para("The chunk requested at step t (from the observation o_t) arrives d control steps later (simulated, "
             "so the numbers do not depend on the machine). **sync**: the robot waits while a chunk is inferred; "
             "in the simulator the env is not stepped meanwhile, so success does not depend on d, and the cost "
             "shows as idle steps (d per chunk). **naive**: the current chunk runs on during inference and the "
             "robot then switches to the new chunk at its action d. **rtc**: the same timing, and the policy "
             "inpaints the d actions that run during inference (real-time chunking). Mode `none` only."),
        Para("Δa: the mean over consecutive executed actions of mean_i |a_t[i] - a_(t-1)[i]| (raw action units), "
             "at chunk boundaries (a_t from another chunk than a_(t-1)) and within chunks; boundary / within "
             "near 1: the switch is as smooth as the chunk itself.", note=True),
    ]
    if figure is not None:
        blocks.append(Figure(figure, f"{simulator} latency", "Success rate (95% intervals) and mean action change "
                             "at chunk boundaries (solid) and within chunks (dotted) against the inference delay, "
                             "per chunking strategy."))
    for r in runs:
        sim = r["sim"][simulator]
        rows = [[Cell(row["chunking"], "text"), Cell(str(row["inference_delay"])), fmt_rate(row),
                 fmt(row["boundary"]), fmt(row["within"]), fmt(row["ratio"]), fmt(row["idle_per_episode"])]
                for row in sim["latency"]]
        s = sim.get("n_action_steps")
        blocks.append(Table(["chunking", "delay d", "success", "Δa boundary", "Δa within", "boundary / within",
                             "idle steps / episode"], rows,
                            caption=f"{r['label']}: all tasks" + (f", execution horizon s = {s}" if s else "")
                            + f", step {sim['step']}, `{sim['file']}`"))
    return blocks


def build_document(data: Record, plots: Plots, seeds: list[Block] | None = None) -> list[Block]:
    """Every section of the report, in order; `seeds` (the "Across seeds" section, fplus.report.render_seeds)
    follows the Runs section."""
    runs = data["runs"]
    doc: list[Block] = [
        Heading(1, "fplus report"),
        Para(f"Generated {data['generated']} by fplus {data['fplus_version']} from "
             + ", ".join(f"`{r['path']}`" for r in runs) + "."),
        Para(f"`{NA}`: not available yet (see the notes at the end); `{NOT_APPLICABLE}`: the experiment has no such "
             "part (no world loss, no gate, no injected memory for the corruption modes to act on).", note=True),
        Heading(2, "Runs"),
        runs_table(data),
    ]
    if plots.losses:
        doc.append(Figure(plots.losses, "loss curves", "Training loss terms per run (log scale where the values "
                          "span a factor of 5 or more); the last panel is the validation action MSE."))
    if plots.gate:
        doc.append(Figure(plots.gate, "gate over steps", "tanh(gate) of the injection: how much of the predicted "
                          "future reaches the action tokens (0 at init)."))
    doc += seeds or []

    doc += [Heading(2, "Action error under corruption of the future memory"),
            Para("Expected: corrupting the memory hurts more as the gate opens; the oracle (true future) helps. "
                 "Δ is the MSE minus the MSE with the uncorrupted memory (`none`); positive = worse.")]
    doc.append(Heading(3, "Validation during training"))
    doc += _side_by_side(data, lambda r: r["val_latest"], "mse", "delta",
                         "Validation (latest val line of metrics.jsonl), normalised action MSE.")
    if plots.delta_vs_gate:
        doc.append(Figure(plots.delta_vs_gate, "corruption delta vs gate",
                          "delta(mode) vs gate over the validation points: per run with an injected memory, at each "
                          "val line x = gate, y = val MSE(mode) - val MSE(none); above 0 the corruption hurts."))
    else:
        doc.append(Para(f"Corruption delta vs gate: {NA} (no run with an injected memory has validation lines "
                        "with a gate and corruption modes yet).", note=True))
    doc.append(Heading(3, "Offline eval"))
    if any(r["offline"] for r in runs):
        doc += _side_by_side(data, lambda r: r["offline"], "mse_norm", "delta_norm",
                             "Offline eval (`fplus eval`, newest eval/offline-step-*.json), normalised MSE.")
        doc += _side_by_side(data, lambda r: r["offline"], "mse_raw", "delta_raw",
                             "Offline eval, raw action units (MSE averaged over action dimensions).")
        missing = [r["label"] for r in runs if r["offline"] is None]
        if missing:
            doc.append(Para(f"Offline eval {NA} for {', '.join(missing)}: run `fplus eval RUN`.", note=True))
    else:
        doc.append(Para(f"Offline eval: {NA} (no run has an eval/offline-step-*.json yet; run `fplus eval RUN`).",
                        note=True))

    doc.append(Heading(2, "World prediction against its baselines"))
    doc += world_table(data)
    if plots.world_cosine:
        doc.append(Figure(plots.world_cosine, "world cosine vs baselines",
                          "Validation cos(z_pred, z_future) over steps (standardised latents): the Prophet, the "
                          "training mean and copy-last (z_t repeated)."))
    text = text_table(data)
    if text:
        doc += [Heading(2, "CoC text against its baseline"), *text]

    doc.append(Heading(2, "Closed-loop success"))
    simulators = sorted({s for r in runs for s in r["sim"]})
    if not simulators:
        doc.append(Para(f"{NA}: no run has a closed-loop evaluation (eval/sim-*-step-*.json) yet.", note=True))
    for sim in simulators:
        if sim in plots.success:
            doc.append(Figure(plots.success[sim], f"{sim} success rates",
                              "Overall success rate per corruption mode; error bars: 95% interval."))
        doc += sim_tables(data, sim)
        doc += latency_tables(data, sim, plots.latency.get(sim))

    doc.append(Heading(2, "Notes"))
    notes = [f"**{r['label']}**: " + "; ".join(r["notes"]) for r in runs if r["notes"]]
    notes += data.get("notes", [])
    doc.append(Bullets(notes) if notes else Para("Every run is complete and evaluated."))
    return doc


# ----- Markdown -------------------------------------------------------------------------------------------------

def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(doc: list[Block], out_dir: Path) -> str:
    parts: list[str] = []
    for block in doc:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Para):
            parts.append(f"_{block.text}_" if block.note else block.text)
        elif isinstance(block, Bullets):
            parts.append("\n".join(f"- {item}" for item in block.items))
        elif isinstance(block, Figure):
            rel = block.path.relative_to(out_dir).as_posix()
            parts.append(f"![{block.alt}]({rel})" + (f"\n\n_{block.caption}_" if block.caption else ""))
        elif isinstance(block, Table):
            header = list(block.header)
            if block.groups:
                names = [g for g, span in block.groups for _ in range(span)]
                header = [f"{g} {h}".strip() for g, h in zip(names, header, strict=True)]
            align = ["---" if c.style == "text" else "---:" for c in block.rows[0]] if block.rows else \
                ["---"] * len(header)
            lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |", "|" + "|".join(align) + "|"]
            lines += ["| " + " | ".join(_md_escape(c.text) for c in row) + " |" for row in block.rows]
            text = "\n".join(lines)
            parts.append(text + (f"\n\n_{block.caption}_" if block.caption else ""))
    return "\n\n".join(parts) + "\n"


# ----- HTML -----------------------------------------------------------------------------------------------------

CSS = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #1d2330;
       max-width: 1280px; margin: 24px auto; padding: 0 24px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 6px; }
h2 { font-size: 19px; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 2px solid #e3e7ee; }
h3 { font-size: 15px; margin: 22px 0 8px; }
p.note, figcaption, caption { color: #5b6475; font-size: 12.5px; }
code { font: 12.5px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #f2f4f8;
       padding: 1px 4px; border-radius: 3px; }
.table-wrap { overflow-x: auto; margin: 8px 0 16px; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
caption { caption-side: bottom; text-align: left; padding-top: 5px; }
th, td { padding: 5px 10px; border-bottom: 1px solid #e6e9ef; white-space: nowrap; }
th { background: #f5f7fa; font-weight: 600; text-align: center; border-bottom: 2px solid #d5dae3; }
tr.group th { background: #eef1f6; border-bottom: 1px solid #d5dae3; }
tr.group th + th, td.first-of-group, th.first-of-group { border-left: 1px solid #d5dae3; }
tbody tr:nth-child(even) td { background: #fafbfc; }
td.num { text-align: right; }
td.text { text-align: left; }
td.na { text-align: center; color: #9aa3b2; }
td.worse { text-align: right; color: #b42318; }
td.better { text-align: right; color: #067647; }
figure { margin: 12px 0 22px; }
figure img { max-width: 100%; height: auto; border: 1px solid #e6e9ef; border-radius: 4px; }
ul { padding-left: 22px; }
li { margin: 3px 0; }
"""


def _inline(text: str) -> str:
    """Escape, then `code` and **bold** spans."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _html_table(t: Table) -> str:
    group_starts: set[int] = set()
    rows = []
    if t.groups:
        col, cells = 0, []
        for label, span in t.groups:
            if col:
                group_starts.add(col)
            cells.append(f'<th colspan="{span}">{_inline(label)}</th>')
            col += span
        rows.append('<tr class="group">' + "".join(cells) + "</tr>")

    def cls(i: int, style: str | None = None) -> str:
        names = ([style] if style else []) + (["first-of-group"] if i in group_starts else [])
        return f' class="{" ".join(names)}"' if names else ""

    rows.append("<tr>" + "".join(f"<th{cls(i)}>{_inline(h)}</th>" for i, h in enumerate(t.header)) + "</tr>")
    head = "<thead>" + "".join(rows) + "</thead>"
    body = "".join("<tr>" + "".join(f"<td{cls(i, c.style)}>{_inline(c.text)}</td>" for i, c in enumerate(row))
                   + "</tr>" for row in t.rows)
    caption = f"<caption>{_inline(t.caption)}</caption>" if t.caption else ""
    return f'<div class="table-wrap"><table>{caption}{head}<tbody>{body}</tbody></table></div>'


def to_html(doc: list[Block], title: str = "fplus report") -> str:
    parts: list[str] = []
    for block in doc:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{_inline(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            parts.append(f'<p class="note">{_inline(block.text)}</p>' if block.note
                         else f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Bullets):
            parts.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block.items) + "</ul>")
        elif isinstance(block, Figure):
            data = base64.b64encode(block.path.read_bytes()).decode("ascii")
            caption = f"<figcaption>{_inline(block.caption)}</figcaption>" if block.caption else ""
            parts.append(f'<figure><img alt="{html.escape(block.alt)}" src="data:image/png;base64,{data}">'
                         f"{caption}</figure>")
        elif isinstance(block, Table):
            parts.append(_html_table(block))
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")
