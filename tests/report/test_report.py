"""`fplus report`: collected numbers equal the run files (golden values), files and images exist, n/a handling,
errors on paths that are not runs, the CLI end to end. Runs are fabricated (no training): `make_runs`."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fplus.errors import FplusError
from fplus.report import collect as c
from fplus.report.report import write_report
from tests.helpers import run_cli

FPLUS = str(Path(sys.executable).with_name("fplus"))
ALL_MODES = ("none", "zero", "random", "shuffle", "oracle", "history")
MEMORY_MODES = ALL_MODES[1:]
TOTAL, PER_EPOCH, LOG_EVERY = 120, 40, 10
TASKS = ("reach-v3", "push-v3", "drawer-open-v3")
# How much each corruption mode moves the validation MSE per unit of gate (oracle helps, the rest hurt).
DELTA_PER_GATE = {"zero": 0.6, "random": 0.9, "shuffle": 0.4, "oracle": -0.25, "history": 0.2}
GATE_MAX = {"E2": 0.35, "E4": 0.5}
FLOOR = {"E0": 0.09, "E2": 0.06, "E4": 0.045}  # where each experiment's action loss levels off


# ----- fabricated runs ------------------------------------------------------------------------------------------

def _wilson(successes: int, n: int, z: float = 1.96) -> list[float]:
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def _gate(exp: str, step: int) -> float:
    return round(GATE_MAX[exp] * (1 - math.exp(-step / 45)), 6)


def _train_line(exp: str, step: int) -> dict:
    wiggle = 0.01 * math.sin(step)  # deterministic noise
    l_action = round(0.9 * math.exp(-step / 35) + FLOOR[exp] + wiggle, 6)
    line = {"step": step, "epoch": (step - 1) // PER_EPOCH, "kind": "train", "l_action": l_action}
    loss = l_action
    if exp in ("E2", "E4"):
        l_world = round(0.7 * math.exp(-step / 50) + (0.12 if exp == "E2" else 0.09), 6)
        line.update(l_world=l_world, cos_world=round(1 - l_world, 6), gate=_gate(exp, step),
                    p_oracle=round(0.9 - 0.8 * step / (TOTAL - 1), 6))
        loss += 0.5 * l_world
    if exp == "E4":
        l_text, l_align = round(2.5 * math.exp(-step / 60) + 0.4, 6), round(0.5 * math.exp(-step / 40) + 0.05, 6)
        line.update(l_text=l_text, l_align=l_align, cos_align=round(1 - l_align, 6))
        loss += 0.1 * l_text + 0.2 * l_align
    line.update(loss=round(loss, 6), grad_norm=round(1.5 * math.exp(-step / 80), 6), samples_per_s=31.5,
                lr_backbone=1e-5, lr_heads=1e-4)
    if exp != "E0":
        line["lr_prophet"] = 3e-4
    return line


def _world(exp: str, step: int) -> dict:
    """The world cosines (Prophet, baselines; standardised and raw) of a run with a Prophet at `step`."""
    gate = _gate(exp, step)
    return {"prophet": round(0.5 + gate, 6), "mean": 0.02, "copy": 0.61, "prophet_raw": round(0.995 + gate / 100, 6),
            "mean_raw": 0.9987, "copy_raw": 0.9991}


def _val_line(exp: str, step: int) -> dict:
    none = round(0.5 * math.exp(-step / 60) + 0.7 * FLOOR[exp] + 0.05, 6)
    line = {"step": step, "epoch": step // PER_EPOCH, "kind": "val", "val_mse_none": none}
    if exp in ("E2", "E4"):
        gate = _gate(exp, step)
        line.update({f"val_mse_{m}": round(none + k * gate, 6) for m, k in DELTA_PER_GATE.items()})
        w = _world(exp, step)
        line.update(gate=gate, val_cos_world=w["prophet"], val_cos_world_mean=w["mean"],
                    val_cos_world_copy=w["copy"], val_cos_world_raw=w["prophet_raw"],
                    val_cos_world_mean_raw=w["mean_raw"], val_cos_world_copy_raw=w["copy_raw"])
    if exp == "E4":
        line.update(val_cos_align=0.7, val_l_text=round(5.0 - step / 100, 6), val_l_text_unigram=4.24)
    return line


def _offline(run: Path, exp: str, step: int, modes_of_e0=("none",)) -> dict:
    base = {"E0": 0.2, "E2": 0.15, "E4": 0.12}[exp]
    gate = _gate(exp, step) if exp != "E0" else None
    modes = {}
    for mode in ALL_MODES if exp != "E0" else modes_of_e0:
        shift = 0.0 if gate is None or mode == "none" else DELTA_PER_GATE[mode] * gate
        mse = round(base + shift, 6)
        modes[mode] = {"mse_norm": mse, "mse_raw": round(mse * 0.04, 8), "mse_per_dim_raw": [round(mse * 0.03, 8),
                       round(mse * 0.05, 8)], "cos_world": None if gate is None else 0.8, "samples": 96,
                       "action_steps": 1536}
    return {"run": str(run), "experiment": exp, "step": step, "gate": gate, "action_names": ["dx", "dy"],
            "modes": modes, "world": None if exp == "E0" else {**_world(exp, step), "prophet": 0.8}}


def _sim(run: Path, exp: str, step: int, modes=("none", "zero", "oracle"), episodes: int = 10,
         episodes_per_mode: dict | None = None) -> dict:
    """As fplus.eval.closed_loop writes it: `oracle` cells n/a (and not in `overall`), modes may use fewer episodes
    than `none` (`episodes_per_mode`; omitted, as in files written before modes could differ, when None)."""
    skill = {"E0": 4, "E2": 6, "E4": 7}[exp]
    effect = {"none": 0, "zero": -2, "random": -3, "shuffle": -1, "history": -1}
    per_mode = {m: (episodes_per_mode or {}).get(m, episodes) for m in modes}
    tasks, overall = {}, {}
    for i, task in enumerate(TASKS):
        tasks[task] = {}
        for m in modes:
            if m == "oracle":
                tasks[task][m] = {"successes": None, "episodes": 0, "rate": None, "ci95": None,
                                  "note": "the future of a live rollout is not observed"}
                continue
            n = per_mode[m]
            s = max(0, min(n, skill - i + (effect[m] if exp != "E0" else 0)))
            tasks[task][m] = {"successes": s, "episodes": n, "rate": s / n, "ci95": _wilson(s, n)}
    for m in modes:
        if m != "oracle":
            s, n = sum(tasks[t][m]["successes"] for t in TASKS), per_mode[m] * len(TASKS)
            overall[m] = {"successes": s, "episodes": n, "rate": s / n, "ci95": _wilson(s, n)}
    out = {"run": str(run), "experiment": exp, "step": step, "simulator": "metaworld", "episodes_per_task": episodes,
           "tasks": tasks, "overall": overall}
    if episodes_per_mode is not None:
        out["episodes_per_mode"] = {m: 0 if m == "oracle" else n for m, n in per_mode.items()}
    return out


SIM_OF = {"E0": {"modes": ("none",)},  # no injected memory: the closed loop evaluates `none` only
          "E2": {"modes": ("none", "zero", "oracle", "history"), "episodes_per_mode": {"zero": 8, "history": 8}},
          "E4": {"modes": ("none", "zero", "oracle")}}


def make_run(root: Path, exp: str, *, upto: int = TOTAL, offline: bool = True, sim: bool = True) -> Path:
    """A run directory as the training recipe and `fplus eval` leave it, trained to step `upto`. Closed loop: E2's
    memory modes use 8 episodes per task against 10 for `none`."""
    run = root / exp
    run.mkdir(parents=True)
    settings = {"EXPERIMENT": exp, "DATASET": "outputs/demo/data", "BACKBONE": "tiny", "LOG_EVERY": LOG_EVERY,
                "MAX_EPOCHS": TOTAL // PER_EPOCH, "OUTPUT_DIR": str(root)}
    policy = {"action_horizon": 8, "prophet": exp != "E0", "injection": exp in ("E2", "E4")}
    (run / "config.json").write_text(json.dumps({"settings": settings, "policy": policy,
                                                 "dataset_fingerprint": "abc123", "fplus_version": "0.1.0",
                                                 "steps_per_epoch": PER_EPOCH, "total_steps": TOTAL}))
    lines = []
    for step in range(LOG_EVERY, upto + 1, LOG_EVERY):
        lines.append(_train_line(exp, step))
        if step % PER_EPOCH == 0:
            lines.append(_val_line(exp, step))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if upto == TOTAL:
        (run / "COMPLETE").write_text(json.dumps({"step": TOTAL}))
    if offline or sim:
        (run / "eval").mkdir()
    if offline:
        (run / "eval" / f"offline-step-{upto // 2:06d}.json").write_text(json.dumps(_offline(run, exp, upto // 2)))
        (run / "eval" / f"offline-step-{upto:06d}.json").write_text(json.dumps(_offline(run, exp, upto)))
    if sim:
        sim_file = _sim(run, exp, upto, **SIM_OF[exp])
        (run / "eval" / f"sim-metaworld-step-{upto:06d}.json").write_text(json.dumps(sim_file))
    return run


def make_runs(root: Path, complete: bool = False) -> list[Path]:
    """E0, E2 complete and evaluated (offline + Meta-World); E4 stopped at step 80 and not evaluated (unless
    `complete`)."""
    runs = [make_run(root, "E0"), make_run(root, "E2")]
    runs.append(make_run(root, "E4") if complete else make_run(root, "E4", upto=80, offline=False, sim=False))
    return runs


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    runs = make_runs(root)
    files = write_report(runs, root / "report")
    return runs, files, json.loads(files.json.read_text())


def _by_label(data: dict) -> dict:
    return {r["label"]: r for r in data["runs"]}


# ----- tests ----------------------------------------------------------------------------------------------------

def test_collected_numbers_equal_the_inputs(reported):
    runs, files, data = reported
    r = _by_label(data)
    assert list(r) == ["E0", "E2", "E4"] and data["modes"] == list(ALL_MODES)
    assert data["loss_terms"] == ["loss", "l_action", "l_world", "l_text", "l_align"]
    # golden values, straight from the fabricated files
    assert r["E2"]["steps"] == 120 and r["E2"]["total_steps"] == 120 and r["E2"]["complete"] is True
    last = _train_line("E2", 120)
    assert r["E2"]["final_train"] == {t: last[t] for t in ("loss", "l_action", "l_world")}
    assert r["E2"]["final_gate"] == last["gate"] == pytest.approx(0.325681, abs=1e-6)
    assert r["E0"]["final_gate"] is None and set(r["E0"]["final_train"]) == {"loss", "l_action"}
    assert r["E4"]["final_train"]["l_align"] == _train_line("E4", 80)["l_align"]
    assert r["E0"]["description"] == "VLM-BC baseline"
    # latest val line, deltas vs none
    val = _val_line("E2", 120)
    latest = r["E2"]["val_latest"]
    assert latest["step"] == 120 and latest["gate"] == val["gate"]
    for mode in ALL_MODES:
        assert latest["modes"][mode]["mse"] == val[f"val_mse_{mode}"]
    assert latest["modes"]["none"]["delta"] is None
    assert latest["modes"]["zero"]["delta"] == pytest.approx(0.6 * val["gate"], abs=2e-6)
    assert latest["modes"]["oracle"]["delta"] < 0
    assert list(r["E0"]["val_latest"]["modes"]) == ["none"]
    assert [h["step"] for h in r["E2"]["val_history"]] == [40, 80, 120]
    gates = [h["gate"] for h in r["E2"]["val_history"]]
    assert gates == sorted(gates) and gates[0] > 0  # the gate opens ...
    deltas = [h["modes"]["random"] - h["modes"]["none"] for h in r["E2"]["val_history"]]
    assert deltas == sorted(deltas)  # ... and corruption hurts more
    # offline eval: the newest file, normalised and raw, with deltas
    off = r["E2"]["offline"]
    written = json.loads((runs[1] / "eval" / "offline-step-000120.json").read_text())
    assert off["file"] == "offline-step-000120.json" and off["step"] == 120
    for mode in ALL_MODES:
        assert off["modes"][mode]["mse_norm"] == written["modes"][mode]["mse_norm"]
        assert off["modes"][mode]["mse_raw"] == written["modes"][mode]["mse_raw"]
    assert off["modes"]["zero"]["delta_norm"] == pytest.approx(0.6 * _gate("E2", 120), abs=2e-6)
    assert off["modes"]["zero"]["delta_raw"] == pytest.approx(0.04 * 0.6 * _gate("E2", 120), abs=1e-7)
    assert list(r["E0"]["offline"]["modes"]) == ["none"] and r["E0"]["offline"]["world"] is None
    assert off["world"] == written["world"] and off["world"]["prophet"] == 0.8
    assert [r[k]["has_memory"] for k in r] == [False, True, True] and r["E0"]["has_prophet"] is False
    # closed loop
    sim = r["E2"]["sim"]["metaworld"]
    written = json.loads((runs[1] / "eval" / "sim-metaworld-step-000120.json").read_text())
    assert sim["overall"] == written["overall"] and sim["tasks"] == written["tasks"]
    assert sim["overall"]["none"] == {"successes": 15, "episodes": 30, "rate": 0.5, "ci95": [0.3315, 0.6685]}
    assert sim["overall"]["zero"] == {"successes": 9, "episodes": 24, "rate": 0.375, "ci95": _wilson(9, 24)}
    assert sim["episodes_per_task"] == 10 and list(sim["overall"]) == ["none", "zero", "history"]
    assert sim["episodes_per_mode"] == {"none": 10, "zero": 8, "history": 8}
    assert sim["tasks"]["push-v3"]["oracle"]["successes"] is None


def _pixels_of(png: Path, colour: str) -> int:
    """How many pixels of `png` have exactly the colour `colour` ("#rrggbb")."""
    import numpy as np
    from PIL import Image

    rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    with Image.open(png) as im:
        return int((np.asarray(im.convert("RGB")) == rgb).all(-1).sum())


def test_files_exist_and_plots_are_valid_pngs(reported):
    from matplotlib.colors import to_hex
    from PIL import Image

    from fplus.report import plots

    runs, files, data = reported
    for f in (files.markdown, files.html, files.json):
        assert f.is_file() and f.stat().st_size > 0
    # report.json is the collected numbers (an independent collect of the same runs) plus the report's own keys
    assert set(data) - set(c.collect(runs)) == {"generated", "fplus_version", "notes", "plots"}
    assert {k: v for k, v in data.items() if k not in ("generated", "fplus_version", "notes", "plots")} == \
        json.loads(json.dumps(c.collect(runs)))
    names = sorted(p.name for p in files.plots)
    assert names == ["delta_vs_gate.png", "gate.png", "losses.png", "success-metaworld.png", "world_cosine.png"]
    assert data["plots"] == [f"plots/{p.name}" for p in files.plots]
    for png in files.plots:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 200
    # what is drawn: one line per run in its colour; the gate figure has E2 and E4 (E0 has no gate)
    by_name = {png.name: png for png in files.plots}
    colour = [to_hex(plots.run_color(i)) for i in range(3)]  # E0, E2, E4
    assert all(_pixels_of(by_name["losses.png"], colour[i]) > 100 for i in range(3))
    gate = [_pixels_of(by_name["gate.png"], colour[i]) for i in range(3)]
    assert gate[0] == 0 and gate[1] > 100 and gate[2] > 100, gate
    for line in ("prophet", "copy"):  # the world cosine figure: the Prophet and its copy-last baseline
        assert _pixels_of(by_name["world_cosine.png"], plots.WORLD_LINES[line][1]) > 100, line


def test_markdown_and_html_sections(reported):
    _, files, _ = reported
    md, page = files.markdown.read_text(), files.html.read_text()
    for heading in ("# fplus report", "## Runs", "## Action error under corruption of the future memory",
                    "## World prediction against its baselines", "## Closed-loop success", "## Notes"):
        assert heading in md
    for png in files.plots:  # Markdown: relative paths that exist
        assert f"](plots/{png.name})" in md
    assert "| run | experiment | steps | complete | loss | l_action | l_world | l_text | l_align | gate |" in md
    assert "| E2 | Model F (Prophet + gated injection) | 120 / 120 | yes |" in md
    # HTML: self-contained (figures embedded, no external resources)
    assert page.count("data:image/png;base64,") == len(files.plots)
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)
    assert "<style>" in page and "Model F (Prophet + gated injection)" in page


def test_missing_pieces_are_na_with_notes(reported):
    _, files, data = reported
    e4 = _by_label(data)["E4"]
    assert e4["complete"] is False and e4["steps"] == 80
    assert e4["offline"] is None and e4["sim"] == {}
    assert "training not complete (step 80 of 120)" in e4["notes"]
    assert any(n.startswith("no offline eval yet") for n in e4["notes"])
    assert "no closed-loop eval yet" in e4["notes"]
    md = files.markdown.read_text()
    assert "| E4 | full F+ (world + injection + CoC + FLARE) | 80 / 120 | no |" in md
    assert "Offline eval n/a for E4" in md and "n/a for E4: no metaworld evaluation yet." in md
    assert "training not complete (step 80 of 120)" in md
    assert any(n.startswith("E4: training not complete") for n in files.notes)


def test_a_run_with_nothing_but_its_config(tmp_path):
    run = tmp_path / "E2"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"settings": {"EXPERIMENT": "E2"}, "total_steps": 50}))
    files = write_report([run], tmp_path / "out")
    data = json.loads(files.json.read_text())
    r = data["runs"][0]
    assert r["steps"] is None and r["final_train"] == {} and r["val_latest"] is None and r["offline"] is None
    assert files.plots == [] and data["loss_terms"] == [] and data["modes"] == []
    md = files.markdown.read_text()
    assert "| E2 | Model F (Prophet + gated injection) | n/a | no | n/a |" in md
    assert "no metrics.jsonl yet" in md and "Offline eval: n/a" in md


def test_partial_metrics_line_is_skipped_with_a_note(tmp_path):
    run = make_run(tmp_path, "E2", upto=40, offline=False, sim=False)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 50, "epoch": 1, "kind": "tr')  # a run being written
    r = c.collect_run(run)
    assert r["steps"] == 40 and "1 unreadable line(s) in metrics.jsonl skipped" in r["notes"]


def test_custom_and_duplicate_runs_get_distinct_labels(tmp_path):
    a, b = make_run(tmp_path / "a", "E2", sim=False), make_run(tmp_path / "b", "E2", sim=False)
    custom = tmp_path / "mine"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({"settings": {"EXPERIMENT": None}}))
    data = c.collect([a, b, custom])
    assert [r["label"] for r in data["runs"]] == ["E2 (E2) #1", "E2 (E2) #2", "mine"]
    assert data["runs"][2]["description"] == "custom run"


@pytest.mark.parametrize("kind", ["missing", "file", "empty", "parent", "bad-json"])
def test_not_a_run_directory_is_a_clear_error(tmp_path, kind):
    path = tmp_path / "x"
    if kind == "file":
        path.write_text("hi")
    elif kind == "empty":
        path.mkdir()
    elif kind == "parent":
        make_run(path, "E0", offline=False, sim=False)
        make_run(path, "E2", offline=False, sim=False)
    elif kind == "bad-json":
        path.mkdir()
        (path / "config.json").write_text("{not json")
    expected = {"missing": "does not exist", "file": "is not a run directory", "empty": r"config.json missing\)$",
                "parent": "contains the runs E0, E2: pass those",
                "bad-json": rf"^the run configuration {re.escape(str(path / 'config.json'))} is not valid JSON: line 1 "
                            r"column 2: .*; restore it \(it is written once, when the run starts\) or start the run "
                            r"again in a new directory$"}
    with pytest.raises(FplusError, match=expected[kind]):
        write_report([path], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are checked


def test_no_runs_is_an_error(tmp_path):
    with pytest.raises(FplusError, match="no runs given"):
        write_report([], tmp_path / "out")


def test_without_matplotlib_the_tables_are_still_written(tmp_path, monkeypatch):
    from fplus.report import report as report_mod

    monkeypatch.setattr(report_mod, "_matplotlib_available", lambda: False)
    files = write_report([make_run(tmp_path, "E2")], tmp_path / "out")
    assert files.plots == [] and "matplotlib is not installed" in files.markdown.read_text()


def test_rerun_removes_stale_plots(tmp_path):
    out = tmp_path / "out"
    (out / "plots").mkdir(parents=True)
    for name in ("gate.png", "success-libero.png", "mine.png"):  # left by an earlier report (and one of ours)
        (out / "plots" / name).write_bytes(b"old")
    files = write_report([make_run(tmp_path, "E0", sim=False)], out)  # E0 alone: no gate, no sim
    assert [p.name for p in files.plots] == ["losses.png"]
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["losses.png", "mine.png"]


def test_modes_match_the_corruption_module():
    import ast

    import fplus

    source = (Path(fplus.__file__).parent / "model" / "corruption.py").read_text()  # parsed: importing needs torch
    assigned = [n.value for n in ast.parse(source).body
                if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "MODES"]
    assert c.MODES == ast.literal_eval(assigned[0])


def test_cli(tmp_path):
    runs = make_runs(tmp_path)
    out = run_cli("report", *runs, "--out", tmp_path / "rep")
    assert out.exit_code == 0, out.stderr
    assert (tmp_path / "rep" / "report.html").is_file() and (tmp_path / "rep" / "plots" / "losses.png").is_file()
    # the command writes what the library writes for the same runs (all but the time stamp)
    library = json.loads(write_report(runs, tmp_path / "lib").json.read_text())
    command = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert {k: v for k, v in command.items() if k != "generated"} == \
        {k: v for k, v in library.items() if k != "generated"}
    assert (tmp_path / "rep" / "report.md").read_text() == \
        (tmp_path / "lib" / "report.md").read_text().replace(library["generated"], command["generated"])
    assert "n/a E4: training not complete (step 80 of 120)" in out.stdout and "5 plot(s)" in out.stdout
    bad = run_cli("report", tmp_path, "--out", tmp_path / "rep2")
    assert bad.exit_code == 1
    err = bad.stderr.strip()
    assert len(err.splitlines()) == 1 and "is not a run directory" in err and "contains the runs E0, E2, E4" in err


def test_libero_results_show_their_suite_beside_metaworld(tmp_path):
    run = make_run(tmp_path / "runs", "E2")
    libero = {**_sim(run, "E2", TOTAL), "simulator": "libero", "suite": "libero_goal"}
    (run / "eval" / f"sim-libero-step-{TOTAL:06d}.json").write_text(json.dumps(libero))
    files = write_report([run], tmp_path / "report")
    data = json.loads(files.json.read_text())
    sims = data["runs"][0]["sim"]
    assert set(sims) == {"libero", "metaworld"} and sims["libero"]["suite"] == "libero_goal"
    assert sims["libero"]["overall"] == libero["overall"]
    md = files.markdown.read_text()
    assert "### libero libero_goal: E2 per task" in md and "### metaworld: E2 per task" in md
    assert {p.name for p in files.plots} >= {"success-libero.png", "success-metaworld.png"}


# ----- runs without an injected memory, delta vs gate, world baselines, episodes per mode --------------------------

def _md_tables(md: str) -> list[tuple[list[str], list[list[str]], str]]:
    """(header, rows, caption) of every Markdown table, the caption being the note paragraph that follows it."""
    parts = md.split("\n\n")
    out = []
    for i, part in enumerate(parts):
        if not part.startswith("| "):
            continue
        lines = part.splitlines()
        header, *rows = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines if
                         not line.startswith("|-") and not line.startswith("|---")]
        caption = parts[i + 1] if i + 1 < len(parts) and parts[i + 1].startswith("_") else ""
        out.append((header, rows, caption))
    return out


def _table(md: str, caption_starts: str) -> tuple[list[str], list[list[str]]]:
    found = [(h, r) for h, r, cap in _md_tables(md) if cap.startswith(f"_{caption_starts}")]
    assert len(found) == 1, f"{len(found)} tables captioned {caption_starts!r}"
    return found[0]


def _column(header: list[str], rows: list[list[str]], name: str) -> dict[str, str]:
    j = header.index(name)
    return {row[0]: row[j] for row in rows}


@pytest.mark.parametrize("legacy", [False, True])
def test_runs_without_memory_print_dashes_in_every_memory_mode(tmp_path, legacy):
    """E0 (policy.injection false) shows `-` under zero, random, shuffle, oracle and history in the validation,
    offline and closed-loop tables, even when (legacy) its files hold numbers for those modes."""
    e0, e2 = make_run(tmp_path / "runs", "E0"), make_run(tmp_path / "runs", "E2")
    if legacy:  # an E0 evaluated as if it had a memory: numbers that only repeat `none`
        lines = [json.loads(line) for line in (e0 / "metrics.jsonl").read_text().splitlines()]
        for line in lines:
            if line["kind"] == "val":
                line.update({f"val_mse_{m}": line["val_mse_none"] for m in MEMORY_MODES})
        (e0 / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        (e0 / "eval" / "offline-step-000120.json").write_text(json.dumps(_offline(e0, "E0", 120, ALL_MODES)))
        (e0 / "eval" / "sim-metaworld-step-000120.json").write_text(
            json.dumps(_sim(e0, "E0", 120, modes=("none", "zero", "shuffle", "history"))))
    files = write_report([e0, e2], tmp_path / "report")
    md, page = files.markdown.read_text(), files.html.read_text()
    data = _by_label(json.loads(files.json.read_text()))
    for caption in ("Validation", "Offline eval (", "Offline eval, raw"):
        header, rows = _table(md, caption)
        modes = {row[0]: row for row in rows}
        assert list(modes) == list(ALL_MODES)
        e0_cols = [j for j, h in enumerate(header) if h.startswith("E0")]
        e2_cols = [j for j, h in enumerate(header) if h.startswith("E2")]
        assert len(e0_cols) == len(e2_cols) == 2
        for mode in MEMORY_MODES:
            assert [modes[mode][j] for j in e0_cols] == ["-", "-"], (caption, mode)
            assert all(re.fullmatch(r"[+-]?\d[\d.e+-]*", modes[mode][j]) for j in e2_cols), (caption, mode)
        assert re.fullmatch(r"\d[\d.e-]*", modes["none"][e0_cols[0]])  # E0's own number is shown
    header, rows = _table(md, "success rate")  # closed loop, all tasks: runs x modes
    assert header == ["run", "step", "none", "zero", "history"]
    assert rows[0] == ["E0", "120", "30% [17, 48] (9/30)", "-", "-"] and _wilson(9, 30) == [0.1666, 0.4788]
    assert rows[1][:3] == ["E2", "120", "50% [33, 67] (15/30)"] and rows[1][3].endswith("(9/24)")
    header, rows = _table(md, "10 episodes per task and mode")  # E0 per task
    assert header == ["task", "none", "zero", "history"] and all(row[2:] == ["-", "-"] for row in rows)
    assert '<td class="na">-</td>' in page
    # the numbers are not in report.json either
    assert list(data["E0"]["val_latest"]["modes"]) == ["none"] and data["E0"]["has_memory"] is False
    assert all(list(h["modes"]) == ["none"] for h in data["E0"]["val_history"])
    assert list(data["E0"]["offline"]["modes"]) == ["none"]
    assert list(data["E0"]["sim"]["metaworld"]["overall"]) == ["none"]
    dropped = [n for n in data["E0"]["notes"] if n.startswith("no injected memory")]
    if legacy:
        assert dropped == [
            "no injected memory (config.json policy.injection is false): the zero, random, shuffle, oracle, "
            "history results of validation are not shown",
            "no injected memory (config.json policy.injection is false): the zero, random, shuffle, oracle, "
            "history results of offline-step-000120.json are not shown",
            "no injected memory (config.json policy.injection is false): the zero, shuffle, history results of "
            "sim-metaworld-step-000120.json are not shown"]
    else:
        assert dropped == []


def test_has_memory_falls_back_to_the_modes_present(tmp_path):
    """A config.json without `policy.injection` (an older run): a run is taken to have a memory when memory modes
    were evaluated."""
    runs = [make_run(tmp_path, exp, sim=False) for exp in ("E0", "E2")]
    for run in runs:
        config = json.loads((run / "config.json").read_text())
        del config["policy"]
        (run / "config.json").write_text(json.dumps(config))
    e0, e2 = c.collect(runs)["runs"]
    assert (e0["has_memory"], e2["has_memory"]) == (False, True)
    assert (e0["has_prophet"], e2["has_prophet"]) == (False, True)  # world numbers present or not
    assert list(e2["offline"]["modes"]) == list(ALL_MODES)


def _record_lines(monkeypatch) -> tuple[list, list]:
    """Record (label, [(x, y), ...]) of every Axes.plot and the y of every Axes.axhline (and still draw them)."""
    from matplotlib.axes import Axes

    drawn, hlines = [], []
    plot, axhline = Axes.plot, Axes.axhline

    def recording_plot(ax, xs, ys, **kw):
        drawn.append((kw["label"], list(zip(xs, ys, strict=True))))
        return plot(ax, xs, ys, **kw)

    def recording_axhline(ax, y=0, **kw):
        hlines.append(y)
        return axhline(ax, y, **kw)

    monkeypatch.setattr(Axes, "plot", recording_plot)
    monkeypatch.setattr(Axes, "axhline", recording_axhline)
    return drawn, hlines


def test_delta_vs_gate_points_equal_the_val_lines(tmp_path, monkeypatch):
    from fplus.report import plots

    e0, e2 = c.collect([make_run(tmp_path, "E0", sim=False), make_run(tmp_path, "E2", sim=False)])["runs"]
    val = [_val_line("E2", step) for step in (40, 80, 120)]
    expected = {m: [(v["gate"], v[f"val_mse_{m}"] - v["val_mse_none"]) for v in val] for m in MEMORY_MODES}
    points = c.delta_gate_points(e2)
    assert list(points) == list(MEMORY_MODES) and points == expected
    assert points["zero"][0] == pytest.approx((_gate("E2", 40), 0.6 * _gate("E2", 40)), abs=2e-6)
    assert c.delta_gate_points(e0) == {}  # no injected memory: no panel
    # the figure draws exactly these points, one line per mode, and the zero line
    drawn, hlines = _record_lines(monkeypatch)
    assert plots.delta_vs_gate([e0, e2], tmp_path / "d.png") == tmp_path / "d.png"
    assert dict(drawn) == expected and len(drawn) == len(MEMORY_MODES) and hlines == [0]
    assert plots.delta_vs_gate([e0], tmp_path / "none.png") is None


def test_world_cosine_table_and_figure(reported, tmp_path, monkeypatch):
    runs, files, data = reported
    r = _by_label(data)
    assert r["E2"]["world"]["latest"] == {"step": 120, **_world("E2", 120)}
    assert [h["step"] for h in r["E2"]["world"]["history"]] == [40, 80, 120]
    assert r["E0"]["world"] == {"latest": None, "history": []}
    md = files.markdown.read_text()
    header, rows = _table(md, "cos(z_pred, z_future)")
    assert header == ["run", "from", "standardised Prophet", "standardised training mean", "standardised copy-last",
                      "raw Prophet", "raw training mean", "raw copy-last"]
    w2, w4 = _world("E2", 120), _world("E4", 80)
    assert rows == [  # E0 has no Prophet: no row; E4 has no offline eval yet
        ["E2", "validation, step 120", f"{w2['prophet']:.4g}", "0.02", "0.61", f"{w2['prophet_raw']:.5f}",
         "0.99870", "0.99910"],
        ["E2", "offline eval, step 120", "0.8", "0.02", "0.61", f"{w2['prophet_raw']:.5f}", "0.99870", "0.99910"],
        ["E4", "validation, step 80", f"{w4['prophet']:.4g}", "0.02", "0.61", f"{w4['prophet_raw']:.5f}",
         "0.99870", "0.99910"]]
    assert rows[0][2] == "0.8257" and rows[0][5].startswith("0.998")
    assert "A Prophet that does not beat copy-last has learnt nothing beyond the present." in md
    assert "](plots/world_cosine.png)" in md
    # the figure: per run, the three standardised curves over the val steps
    from fplus.report import plots

    assert c.world_series(r["E2"]) == {k: [(s, _world("E2", s)[k]) for s in (40, 80, 120)]
                                       for k in ("prophet", "mean", "copy")}
    assert c.world_series(r["E0"]) == {}
    drawn, _ = _record_lines(monkeypatch)
    assert plots.world_cosine(data["runs"], tmp_path / "w.png") is not None
    assert len(drawn) == 6 and drawn[:3] == [
        ("Prophet", c.world_series(r["E2"])["prophet"]), ("training mean", c.world_series(r["E2"])["mean"]),
        ("copy-last (z_t repeated)", c.world_series(r["E2"])["copy"])]


def test_coc_text_table_beside_its_unigram_baseline(reported):
    runs, files, data = reported
    r = _by_label(data)
    assert r["E4"]["text"] == {"step": 80, "l_text": 4.2, "unigram": 4.24}
    assert r["E0"]["text"] is None and r["E2"]["text"] is None
    md = files.markdown.read_text()
    assert "## CoC text against its baseline" in md
    header, rows = _table(md, "CoC text loss")
    assert header == ["run", "from", "L_text", "unigram baseline"]
    assert rows == [["E4", "validation, step 80", "4.2", "4.24"]]  # only E4 logged it
    assert "An L_text above it has not learnt even which tokens the labels use." in md


def test_no_prophet_no_world_table(tmp_path):
    files = write_report([make_run(tmp_path, "E0")], tmp_path / "out")
    md = files.markdown.read_text()
    assert "_World cosine: - (no run has a Prophet)._" in md and "world_cosine.png" not in md
    assert "CoC text against its baseline" not in md  # no CoC run: no section


def test_closed_loop_tables_say_how_many_episodes_each_mode_used(reported):
    _, files, _ = reported
    md = files.markdown.read_text()
    assert "_Episodes per task differ between modes: E2: none 10, zero 8, history 8._" in md
    header, rows = _table(md, "episodes per task: none 10, zero 8, history 8, step 120")  # E2 per task
    assert header == ["task", "none (10 ep.)", "zero (8 ep.)", "history (8 ep.)"]
    zero = _column(header, rows, "zero (8 ep.)")
    assert zero["reach-v3"] == f"50% [{100 * _wilson(4, 8)[0]:.0f}, {100 * _wilson(4, 8)[1]:.0f}] (4/8)"
    assert zero["overall"].endswith("(9/24)")
    assert "_oracle is not in the table: the future of a live rollout is not observed._" in md
    header, _ = _table(md, "10 episodes per task and mode, step 120")  # E0: one count, the plain caption
    assert header == ["task", "none", "zero", "history"]


def test_episodes_per_mode_of_files_without_it(tmp_path):
    """A file written before modes could differ: every mode used `episodes_per_task`; or the task cells tell."""
    run = make_run(tmp_path, "E2", offline=False, sim=False)
    (run / "eval").mkdir()
    path = run / "eval" / "sim-metaworld-step-000120.json"
    path.write_text(json.dumps(_sim(run, "E2", 120, modes=("none", "zero"))))
    assert c.collect_sim(path, "metaworld")["episodes_per_mode"] == {"none": 10, "zero": 10}
    data = _sim(run, "E2", 120, modes=("none", "zero"), episodes_per_mode={"zero": 4})
    del data["episodes_per_mode"]
    path.write_text(json.dumps(data))
    assert c.collect_sim(path, "metaworld")["episodes_per_mode"] == {"none": 10, "zero": 4}


def test_the_report_package_never_imports_torch():
    code = ("import sys; import fplus.report.report, fplus.report.plots, fplus.report.render, fplus.report.collect; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


# ----- latency-aware closed loop --------------------------------------------------------------------------------

# (strategy, d) -> (successes of 30, mean |Δa| at boundaries, within, idle steps per episode)
LATENCY = {("sync", 0): (15, 0.30, 0.10, 0), ("sync", 2): (15, 0.30, 0.10, 12), ("naive", 0): (15, 0.30, 0.10, 0),
           ("naive", 2): (9, 0.60, 0.10, 2), ("naive", 4): (4, 0.90, 0.12, 4), ("rtc", 0): (16, 0.20, 0.10, 0),
           ("rtc", 2): (14, 0.25, 0.10, 2), ("rtc", 4): (11, 0.30, 0.11, 4)}


def _latency_cell(successes: int, episodes: int, boundary: float, within: float, idle: int) -> dict:
    """A latency cell as fplus.eval.closed_loop writes it (100 steps an episode, a switch every 4 steps)."""
    nb = 25 * episodes
    return {"successes": successes, "episodes": episodes, "rate": successes / episodes,
            "ci95": _wilson(successes, episodes),
            "smoothness": {"boundary": boundary, "within": within, "boundary_transitions": nb,
                           "within_transitions": 99 * episodes - nb},
            "steps": 100 * episodes, "idle_steps": idle * episodes}


def _latency_section(settings=LATENCY) -> dict:
    """The `latency` section of a closed-loop file: one task per 10 episodes, three tasks (golden overall)."""
    section: dict = {}
    for (strategy, d), (wins, boundary, within, idle) in settings.items():
        per_task = [wins // 3 + (1 if i < wins % 3 else 0) for i in range(3)]
        section.setdefault(strategy, {})[str(d)] = {
            "chunking": strategy, "inference_delay": d, "execution_horizon": 4, "mode": "none",
            "tasks": {t: _latency_cell(w, 10, boundary, within, idle) for t, w in zip(TASKS, per_task, strict=True)},
            "overall": _latency_cell(wins, 30, boundary, within, idle)}
    return section


def _with_latency(root: Path, exp: str = "E2", section: dict | None = None) -> Path:
    run = make_run(root, exp)
    path = run / "eval" / "sim-metaworld-step-000120.json"
    data = json.loads(path.read_text())
    data.update(n_action_steps=4, latency=_latency_section() if section is None else section)
    path.write_text(json.dumps(data))
    return run


def test_latency_results_are_collected_tabled_and_plotted(tmp_path):
    from matplotlib.colors import to_hex

    from fplus.report import plots

    runs = [make_run(tmp_path, "E0"), _with_latency(tmp_path)]
    files = write_report(runs, tmp_path / "report")
    data = json.loads(files.json.read_text())
    sim = _by_label(data)["E2"]["sim"]["metaworld"]
    assert _by_label(data)["E0"]["sim"]["metaworld"]["latency"] == []
    rows = sim["latency"]
    assert [(r["chunking"], r["inference_delay"]) for r in rows] == list(LATENCY)  # sync, naive, rtc; d ascending
    for row, ((_, _), (wins, boundary, within, idle)) in zip(rows, LATENCY.items(), strict=True):
        assert (row["successes"], row["episodes"], row["rate"], row["ci95"]) == (wins, 30, wins / 30,
                                                                                  _wilson(wins, 30))
        assert (row["boundary"], row["within"], row["execution_horizon"]) == (boundary, within, 4)
        assert row["ratio"] == pytest.approx(boundary / within) and row["idle_per_episode"] == idle
        assert list(row["tasks"]) == list(TASKS) and row["tasks"]["reach-v3"]["episodes"] == 10
    # the table: a row per strategy and delay
    md = files.markdown.read_text()
    assert "### metaworld: inference delay and chunking" in md
    header, table = _table(md, "E2: all tasks, execution horizon s = 4, step 120")
    assert header == ["chunking", "delay d", "success", "Δa boundary", "Δa within", "boundary / within",
                      "idle steps / episode"]
    assert table[3] == ["naive", "2", f"30% [{100 * _wilson(9, 30)[0]:.0f}, {100 * _wilson(9, 30)[1]:.0f}] (9/30)",
                        "0.6", "0.1", "6", "2"]
    assert [r[:2] for r in table] == [[s, str(d)] for s, d in LATENCY]
    assert "inference delay and chunking" in files.html.read_text()
    # the figure: success and action change against d, a line per strategy in its colour
    assert "plots/latency-metaworld.png" in data["plots"] and "![metaworld latency](plots/latency-metaworld.png)" in md
    png = tmp_path / "report" / "plots" / "latency-metaworld.png"
    for strategy in ("sync", "naive", "rtc"):
        assert _pixels_of(png, to_hex(plots.STRATEGY_COLORS[strategy])) > 100, strategy
    # a later report of runs without latency results drops the stale figure
    again = write_report([runs[0]], tmp_path / "report")
    assert not png.exists() and "inference delay and chunking" not in again.markdown.read_text()


def test_latency_entries_that_are_not_results_are_left_out(tmp_path):
    section = _latency_section({("naive", 2): (9, 0.6, 0.1, 2), ("rtc", 2): (14, 0.25, None, 2)})
    section["rtc"]["2"]["overall"]["smoothness"]["within"] = None  # s = 1: no within-chunk transition
    section["naive"]["x"] = {"overall": {"rate": 0.5}}  # not a delay
    section["sync"] = {"0": {"tasks": {}}}  # no overall
    section["bogus"] = 3
    run = _with_latency(tmp_path, section=section)
    rows = c.collect_sim(run / "eval" / "sim-metaworld-step-000120.json", "metaworld")["latency"]
    assert [(r["chunking"], r["inference_delay"]) for r in rows] == [("naive", 2), ("rtc", 2)]
    assert rows[1]["within"] is None and rows[1]["ratio"] is None
    files = write_report([run], tmp_path / "report")
    _, table = _table(files.markdown.read_text(), "E2: all tasks")
    assert table[1][4:6] == ["n/a", "n/a"]
