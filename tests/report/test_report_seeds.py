"""`fplus report` over seeds: runs grouped by experiment, means and Student t 95% intervals over seeds (hand-computed
here), paired differences against E0 over the common seeds, the learning-curve bands, and single-seed reports
unchanged. Runs are fabricated with chosen numbers (`make_seed_run`), laid out as `fplus matrix` with MATRIX_SEEDS
leaves them (OUTPUT_DIR/E0-seed0, ...)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from fplus.report import collect as c
from fplus.report import seeds as s
from fplus.report.render import Plots, build_document, to_markdown
from fplus.report.render_seeds import SeedPlots, seed_section
from fplus.report.report import write_report
from fplus.report.stats import T975, mean_ci, t975, wilson

T2 = 4.3026527  # t_{0.975, 2}: three seeds
T1 = 12.7062047  # t_{0.975, 1}: two seeds
STEPS = (10, 20, 30)
TASKS = ("reach-v3", "push-v3")
EPISODES = 10  # per task and mode

# The chosen numbers, per (experiment, seed). val: validation MSE under `none` at the last val line (step 30);
# win: closed-loop successes of 2 x 10 episodes per mode; gate: the final gate; prophet: the validation world cosine.
NUMBERS = {
    ("E0", 0): {"val": 0.30, "win": {"none": 8}},
    ("E0", 1): {"val": 0.34, "win": {"none": 10}},
    ("E0", 2): {"val": 0.32, "win": {"none": 9}},
    ("E0", 3): {"val": 0.36, "win": {"none": 11}},
    ("E2", 0): {"val": 0.25, "win": {"none": 12, "zero": 18}, "gate": 0.1, "prophet": 0.6},
    ("E2", 1): {"val": 0.27, "win": {"none": 14, "zero": 20}, "gate": 0.2, "prophet": 0.7},
    ("E2", 2): {"val": 0.23, "win": {"none": 16, "zero": 16}, "gate": 0.3, "prophet": 0.8},
}
ZERO_SHIFT = 0.05  # E2: val MSE(zero) = val MSE(none) + 0.05 * (1 + seed)


def _loss(exp: str, seed: int, step: int) -> float:
    """The total train loss: 1 / (step / 10) + 0.1 * seed (+ 0.5 for E0), so the band over seeds 0..2 is +-0.1."""
    return 10 / step + 0.1 * seed + (0.5 if exp == "E0" else 0.0)


def _val_none(exp: str, seed: int, step: int) -> float:
    return NUMBERS[exp, seed]["val"] + 0.01 * (30 - step)


def _cell(wins: int, episodes: int) -> dict:
    return {"successes": wins, "episodes": episodes, "rate": wins / episodes, "ci95": wilson(wins, episodes)}


def make_seed_run(root: Path, exp: str, seed: int, name: str | None = None, offline: bool = True) -> Path:
    """OUTPUT_DIR/<exp>-seed<seed>: trained to step 30 (complete), offline and Meta-World evaluated."""
    n = NUMBERS[exp, seed]
    memory = exp == "E2"
    run = root / (name or f"{exp}-seed{seed}")
    run.mkdir(parents=True)
    settings = {"EXPERIMENT": exp, "SEED": seed, "SPLIT_SEED": 0, "DATASET": "outputs/demo/data", "BACKBONE": "tiny",
                "RUN_NAME": run.name, "OUTPUT_DIR": str(root)}
    (run / "config.json").write_text(json.dumps({
        "settings": settings, "policy": {"prophet": memory, "injection": memory}, "total_steps": 30,
        "steps_per_epoch": 10}))
    lines = []
    for step in STEPS:
        train = {"step": step, "epoch": step // 10 - 1, "kind": "train", "loss": _loss(exp, seed, step),
                 "l_action": _loss(exp, seed, step) / 2}
        val = {"step": step, "epoch": step // 10 - 1, "kind": "val", "val_mse_none": _val_none(exp, seed, step)}
        if memory:
            gate = n["gate"] * step / 30
            train["gate"] = gate
            val.update(gate=gate, val_mse_zero=_val_none(exp, seed, step) + ZERO_SHIFT * (1 + seed),
                       val_cos_world=n["prophet"] * step / 30, val_cos_world_mean=0.0, val_cos_world_copy=0.5)
        lines += [train, val]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run / "COMPLETE").write_text("{}")
    (run / "eval").mkdir()
    modes = ("none", "zero") if memory else ("none",)
    if offline:
        offline_modes = {m: {"mse_norm": 2 * NUMBERS[exp, seed]["val"] + (0.1 if m == "zero" else 0.0),
                             "mse_raw": 0.01 * (1 + seed)} for m in modes}
        (run / "eval" / "offline-step-000030.json").write_text(json.dumps({
            "step": 30, "gate": n.get("gate"), "modes": offline_modes,
            "world": {"prophet": n["prophet"], "mean": 0.0, "copy": 0.5, "prophet_raw": 0.999, "mean_raw": 0.99,
                      "copy_raw": 0.998} if memory else None}))
    tasks, overall = {}, {}
    for m in modes:
        wins = n["win"][m]
        per_task = (wins // 2 + wins % 2, wins // 2)
        for task, w in zip(TASKS, per_task, strict=True):
            tasks.setdefault(task, {})[m] = _cell(w, EPISODES)
        overall[m] = _cell(wins, EPISODES * len(TASKS))
    (run / "eval" / "sim-metaworld-step-000030.json").write_text(json.dumps({
        "step": 30, "simulator": "metaworld", "episodes_per_task": EPISODES, "tasks": tasks, "overall": overall}))
    return run


def _runs(root: Path, e0_seeds=(0, 1, 2), e2_seeds=(0, 1, 2)) -> list[Path]:
    return [make_seed_run(root, "E0", k) for k in e0_seeds] + [make_seed_run(root, "E2", k) for k in e2_seeds]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    files = write_report(_runs(root / "runs"), root / "report")
    return files, json.loads(files.json.read_text())


def _group(data: dict, label: str) -> dict:
    return next(g for g in data["seeds"]["groups"] if g["label"] == label)


def _ci(mean: float, sd: float, t: float, n: int) -> list[float]:
    half = t * sd / math.sqrt(n)
    return [mean - half, mean + half]


def _md_table(md: str, heading_or_caption: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the Markdown table whose caption starts with `heading_or_caption`."""
    parts = md.split("\n\n")
    for i, part in enumerate(parts):
        if part.startswith("| ") and i + 1 < len(parts) and parts[i + 1].startswith(f"_{heading_or_caption}"):
            lines = [line for line in part.splitlines() if not line.startswith("|-") and not line.startswith("|--")]
            header, *rows = [[x.strip() for x in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]
            return header, rows
    raise AssertionError(f"no table captioned {heading_or_caption!r}")


# ----- statistics -----------------------------------------------------------------------------------------------

def test_t_quantiles_match_known_values():
    known = {1: 12.7062047, 2: 4.3026527, 3: 3.1824463, 5: 2.5705818, 10: 2.2281389, 20: 2.0859634, 30: 2.0422725}
    assert {df: t975(df) for df in known} == known and len(T975) == 30
    # beyond the table: the normal quantile with its Cornish-Fisher correction
    for df, value in {31: 2.0395134, 40: 2.0210754, 60: 2.0002978, 120: 1.9799304, 10 ** 6: 1.9599660}.items():
        assert t975(df) == pytest.approx(value, abs=5e-6), df
    assert all(a > b for a, b in zip([*T975, t975(31)], [*T975[1:], t975(31), t975(32)], strict=True))
    with pytest.raises(ValueError, match="df >= 1"):
        t975(0)


def test_mean_ci_and_wilson_by_hand():
    out = mean_ci([0.30, 0.34, 0.32])
    assert out["mean"] == pytest.approx(0.32) and out["sd"] == pytest.approx(0.02) and out["n"] == 3
    assert out["ci95"] == pytest.approx([0.32 - T2 * 0.02 / math.sqrt(3), 0.32 + T2 * 0.02 / math.sqrt(3)])
    assert out["ci95"] == pytest.approx([0.2703173, 0.3696827], abs=1e-7)
    assert mean_ci([0.9, 1.0, 0.8], (0.0, 1.0))["ci95"] == pytest.approx([0.9 - T2 * 0.1 / math.sqrt(3), 1.0])
    assert mean_ci([0.5]) == {"mean": 0.5, "sd": None, "ci95": None, "n": 1}
    assert mean_ci([0.5, 0.5])["ci95"] == [0.5, 0.5]
    with pytest.raises(ValueError):
        mean_ci([])
    assert wilson(15, 30) == pytest.approx([0.3315, 0.6685], abs=1e-4) and wilson(0, 0) is None


# ----- aggregates -----------------------------------------------------------------------------------------------

def test_groups_and_continuous_aggregates(seeded):
    files, data = seeded
    agg = data["seeds"]
    assert agg["seeded"] is True and agg["baseline"] == "E0" and agg["notes"] == []
    assert [(g["label"], g["seeds"], g["n"]) for g in agg["groups"]] == [("E0", [0, 1, 2], 3), ("E2", [0, 1, 2], 3)]
    e0, e2 = _group(data, "E0"), _group(data, "E2")
    assert e0["runs"] == ["E0 (E0-seed0)", "E0 (E0-seed1)", "E0 (E0-seed2)"] and e0["complete"] == 3
    # validation MSE under none: E0 0.30, 0.34, 0.32; E2 0.25, 0.27, 0.23 (sd 0.02 both)
    none0, none2 = e0["val_latest"]["modes"]["none"]["mse"], e2["val_latest"]["modes"]["none"]["mse"]
    assert none0["values"] == pytest.approx([0.30, 0.34, 0.32]) and none0["seeds"] == [0, 1, 2]
    assert none0["mean"] == pytest.approx(0.32) and none0["ci95"] == pytest.approx(_ci(0.32, 0.02, T2, 3))
    assert none2["mean"] == pytest.approx(0.25) and none2["ci95"] == pytest.approx([0.2003173, 0.2996827], abs=1e-7)
    assert e0["val_latest"]["steps"] == [30, 30, 30] and list(e0["val_latest"]["modes"]) == ["none"]
    # the delta zero - none of E2: 0.05, 0.10, 0.15
    zero = e2["val_latest"]["modes"]["zero"]["delta"]
    assert zero["mean"] == pytest.approx(0.10) and zero["ci95"] == pytest.approx(_ci(0.10, 0.05, T2, 3))
    assert e2["val_latest"]["modes"]["none"]["delta"] is None
    # gate 0.1, 0.2, 0.3 (train and validation); E0 has none
    for gate in (e2["final_gate"], e2["val_latest"]["gate"], e2["offline"]["gate"]):
        assert gate["mean"] == pytest.approx(0.2) and gate["ci95"] == pytest.approx([0.2 - 0.2484138, 0.2 + 0.2484138],
                                                                                     abs=1e-7)
    assert e0["final_gate"] is None
    # final train losses: loss at step 30 = 1/3 + 0.1 * seed (+ 0.5 for E0)
    assert e0["final_train"]["loss"]["mean"] == pytest.approx(10 / 30 + 0.1 + 0.5)
    assert e0["final_train"]["loss"]["ci95"] == pytest.approx(_ci(10 / 30 + 0.6, 0.1, T2, 3))
    # offline: mse_norm = 2 x val; raw 0.01, 0.02, 0.03; deltas (zero) 0.1 on every seed: a zero-width interval
    off = e2["offline"]["modes"]
    assert off["none"]["mse_norm"]["mean"] == pytest.approx(0.5)
    assert off["none"]["mse_norm"]["ci95"] == pytest.approx(_ci(0.5, 0.04, T2, 3))
    assert off["none"]["mse_raw"]["ci95"] == pytest.approx(_ci(0.02, 0.01, T2, 3))
    assert off["zero"]["delta_norm"]["mean"] == pytest.approx(0.1)
    assert off["zero"]["delta_norm"]["ci95"] == pytest.approx([0.1, 0.1], abs=1e-12)
    # world cosines: Prophet 0.6, 0.7, 0.8 against copy-last 0.5 (validation and offline)
    for source in ("validation", "offline"):
        w = e2["world"][source]
        assert w["prophet"]["mean"] == pytest.approx(0.7) and w["prophet"]["ci95"] == pytest.approx(
            _ci(0.7, 0.1, T2, 3))
        assert w["copy"]["mean"] == pytest.approx(0.5) and w["copy"]["ci95"] == pytest.approx([0.5, 0.5])
    assert e0["world"] == {"validation": None, "offline": None}


def test_closed_loop_aggregates_are_t_intervals_of_the_per_seed_rates(seeded):
    _, data = seeded
    e0, e2 = _group(data, "E0")["sim"]["metaworld"], _group(data, "E2")["sim"]["metaworld"]
    none0 = e0["overall"]["none"]  # 8/20, 10/20, 9/20
    assert none0["values"] == pytest.approx([0.4, 0.5, 0.45]) and none0["mean"] == pytest.approx(0.45)
    assert none0["ci95"] == pytest.approx([0.45 - 0.1242069, 0.45 + 0.1242069], abs=1e-7)
    assert (none0["successes"], none0["episodes"]) == (27, 60) and none0["pooled_rate"] == pytest.approx(0.45)
    assert none0["pooled_ci95"] == pytest.approx(wilson(27, 60))
    none2 = e2["overall"]["none"]  # 12/20, 14/20, 16/20
    assert none2["mean"] == pytest.approx(0.7) and none2["ci95"] == pytest.approx(_ci(0.7, 0.1, T2, 3))
    zero2 = e2["overall"]["zero"]  # 18/20, 20/20, 16/20: the t interval is clipped at 100%
    assert zero2["mean"] == pytest.approx(0.9) and zero2["ci95"] == pytest.approx([0.9 - 0.2484138, 1.0], abs=1e-7)
    # per task: reach gets the odd success (E0: 4, 5, 5 of 10)
    assert e0["tasks"]["reach-v3"]["none"]["values"] == pytest.approx([0.4, 0.5, 0.5])
    assert e0["tasks"]["push-v3"]["none"]["values"] == pytest.approx([0.4, 0.5, 0.4])
    assert list(e0["overall"]) == ["none"] and list(e2["overall"]) == ["none", "zero"]


def test_paired_differences_over_seeds(seeded):
    files, data = seeded
    [pair] = data["seeds"]["paired"]
    assert (pair["label"], pair["experiment"], pair["baseline"]) == ("E2 - E0", "E2", "E0")
    assert pair["seeds"] == [0, 1, 2] and pair["only"] == {"E2": [], "E0": []} and pair["notes"] == []
    rows = {r["key"]: r for r in pair["rows"]}
    assert list(rows) == ["val_latest.none.mse", "offline.none.mse_norm", "offline.none.mse_raw",
                          "final_train.l_action", "sim.metaworld.overall.none"]
    val = rows["val_latest.none.mse"]  # 0.25 - 0.30, 0.27 - 0.34, 0.23 - 0.32
    assert val["values"] == pytest.approx([-0.05, -0.07, -0.09]) and val["n"] == 3
    assert val["mean"] == pytest.approx(-0.07) and val["ci95"] == pytest.approx([-0.1196827, -0.0203173], abs=1e-7)
    success = rows["sim.metaworld.overall.none"]  # 0.6 - 0.4, 0.7 - 0.5, 0.8 - 0.45
    assert success["values"] == pytest.approx([0.2, 0.2, 0.35]) and success["kind"] == "rate"
    sd = math.sqrt((0.05 ** 2 + 0.05 ** 2 + 0.1 ** 2) / 2)
    assert success["mean"] == pytest.approx(0.25) and success["ci95"] == pytest.approx(_ci(0.25, sd, T2, 3))
    assert success["ci95"] == pytest.approx([0.0348674, 0.4651326], abs=1e-7)
    assert rows["final_train.l_action"]["values"] == pytest.approx([-0.25] * 3)  # (loss - 0.5) / 2 - loss / 2
    # the table
    md = files.markdown.read_text()
    assert "### E2 - E0 (paired over seeds)" in md
    header, table = _md_table(md, "E2 minus E0, seed by seed")
    assert header == ["figure", "seed 0", "seed 1", "seed 2", "mean", "95% interval", "n"]
    by_figure = {row[0]: row for row in table}
    assert by_figure["validation MSE (none)"] == ["validation MSE (none)", "-0.05", "-0.07", "-0.09", "-0.07",
                                                   "[-0.1197, -0.02032]", "3"]
    assert by_figure["metaworld success (none)"] == ["metaworld success (none)", "+20.0 pp", "+20.0 pp", "+35.0 pp",
                                                      "+25.0 pp", "[+3.5, +46.5] pp", "3"]
    assert "Not paired" not in md
    # another baseline: the same differences, negated; a baseline without runs: no pair, a note
    runs = sorted((files.out.parent / "runs").iterdir())
    [pair] = c.collect(runs, baseline="E2")["seeds"]["paired"]
    assert pair["label"] == "E0 - E2" and pair["rows"][0]["values"] == pytest.approx([0.05, 0.07, 0.09])
    other = c.collect(runs, baseline="E4")["seeds"]
    assert other["paired"] == [] and other["notes"] == ["no paired comparison: the baseline E4 has no runs"]


def test_missing_seeds_are_paired_over_the_common_ones(tmp_path):
    """E0 has seeds 0, 1, 3 and E2 0, 1, 2: the difference is over 0 and 1, and the table says so."""
    runs = _runs(tmp_path / "runs", e0_seeds=(0, 1, 3))
    files = write_report(runs, tmp_path / "report")
    data = json.loads(files.json.read_text())
    [pair] = data["seeds"]["paired"]
    assert pair["seeds"] == [0, 1] and pair["only"] == {"E2": [2], "E0": [3]}
    val = next(r for r in pair["rows"] if r["key"] == "val_latest.none.mse")
    assert val["seeds"] == [0, 1] and val["values"] == pytest.approx([-0.05, -0.07]) and val["n"] == 2
    sd = math.sqrt(2 * 0.01 ** 2)  # differences -0.05, -0.07: mean -0.06
    assert val["ci95"] == pytest.approx(_ci(-0.06, sd, T1, 2))
    assert val["ci95"] == pytest.approx([-0.06 - 0.1270620, -0.06 + 0.1270620], abs=1e-7)
    # each experiment's own aggregate keeps all of its seeds
    assert _group(data, "E0")["seeds"] == [0, 1, 3]
    assert _group(data, "E0")["val_latest"]["modes"]["none"]["mse"]["mean"] == pytest.approx((0.30 + 0.34 + 0.36) / 3)
    md = files.markdown.read_text()
    header, table = _md_table(md, "E2 minus E0, seed by seed")
    assert header == ["figure", "seed 0", "seed 1", "mean", "95% interval", "n"]
    assert table[0] == ["validation MSE (none)", "-0.05", "-0.07", "-0.06", "[-0.1871, +0.06706]", "2"]
    assert "(0, 1); success in percentage points. Not paired: seed 2 only in E2; seed 3 only in E0._" in md


def test_a_seed_without_an_eval_counts_n_and_says_so(tmp_path):
    runs = [make_seed_run(tmp_path, "E2", 0), make_seed_run(tmp_path, "E2", 1),
            make_seed_run(tmp_path, "E2", 2, offline=False)]
    files = write_report(runs, tmp_path / "report")
    data = json.loads(files.json.read_text())
    e2 = _group(data, "E2")
    none = e2["offline"]["modes"]["none"]["mse_norm"]
    assert none["seeds"] == [0, 1] and none["n"] == 2 and none["mean"] == pytest.approx(0.52)
    assert none["ci95"] == pytest.approx(_ci(0.52, math.sqrt(2 * 0.02 ** 2), T1, 2))  # 0.50, 0.54
    assert none["ci95"] == pytest.approx([0.52 - 0.2541241, 0.52 + 0.2541241], abs=1e-7)
    assert e2["offline"]["steps"] == [30, 30, None]
    assert "E2: no offline eval for seed 2: its numbers are over the other seeds" in e2["notes"]
    assert data["seeds"]["paired"] == [] and data["seeds"]["notes"] == []  # one experiment: nothing to pair
    md = files.markdown.read_text()
    assert "0.52 [0.2659, 0.7741] (n=2)" in md  # the offline table marks the smaller n
    assert "E2: no offline eval for seed 2" in md
    assert "E2: no offline eval for seed 2: its numbers are over the other seeds" in files.notes


def test_runs_with_one_seed_twice_are_not_aggregated(tmp_path):
    runs = [make_seed_run(tmp_path, "E2", 0, name="a"), make_seed_run(tmp_path, "E2", 0, name="b")]
    agg = c.collect(runs)["seeds"]
    assert [(g["label"], g["n"]) for g in agg["groups"]] == [("E2 (a)", 1), ("E2 (b)", 1)]
    assert agg["seeded"] is False
    assert agg["notes"] == ["E2: the runs E2 (a), E2 (b) do not have distinct seeds (config.json settings.SEED: 0, "
                            "0); each is reported as its own group"]


def test_the_seed_section_tables(seeded):
    files, data = seeded
    md, page = files.markdown.read_text(), files.html.read_text()
    assert md.index("## Runs") < md.index("## Across seeds") < md.index("## Action error under corruption")
    assert "Across seeds" in page
    header, rows = _md_table(md, "Mean over seeds [95% interval] of the final train losses")
    assert header == ["experiment", "description", "seeds", "complete", "loss", "l_action", "gate"]
    assert rows[0][:4] == ["E0", "VLM-BC baseline", "0, 1, 2", "3/3"] and rows[0][6] == "-"
    assert rows[1][6] == "+0.2000 [-0.0484, +0.4484]"
    header, rows = _md_table(md, "Validation (latest val line), normalised action MSE: mean over seeds")
    assert header == ["corruption", "E0 (n=3, step 30) MSE", "E0 (n=3, step 30) Δ vs none",
                      "E2 (n=3, step 30) MSE", "E2 (n=3, step 30) Δ vs none"]
    assert rows[0] == ["none", "0.32 [0.2703, 0.3697]", "", "0.25 [0.2003, 0.2997]", ""]
    # zero: 0.30, 0.37, 0.38 (sd sqrt(0.0019)); its delta 0.05, 0.10, 0.15
    assert rows[1] == ["zero", "-", "-", "0.35 [0.2417, 0.4583]", "+0.1 [-0.0242, +0.224]"]
    header, rows = _md_table(md, "success rate over seeds")
    assert header == ["experiment", "seeds", "none", "zero"]
    assert rows == [["E0", "3", "45% [33, 57] (27/60)", "-"],
                    ["E2", "3", "70% [45, 95] (42/60)", "90% [65, 100] (54/60)"]]
    _, rows = _md_table(md, "E2 per task, mean over seeds 0, 1, 2, step 30")
    assert [r[0] for r in rows] == ["reach-v3", "push-v3", "overall"]
    _, rows = _md_table(md, "Mean over seeds [95% interval] of cos(z_pred, z_future)")
    assert rows[0][:5] == ["E2", "validation", "0.7 [0.4516, 0.9484]", "0 [0, 0]", "0.5 [0.5, 0.5]"]
    # the per-run tables are still there, one column pair per run
    header, _ = _md_table(md, "Validation (latest val line of metrics.jsonl)")
    assert header[1] == "E0 (E0-seed0) (step 30) MSE" and len(header) == 1 + 2 * 6


def _record(monkeypatch) -> tuple[list, list]:
    """(label, xs, ys) of every Axes.plot and (xs, lo, hi) of every Axes.fill_between (still drawn)."""
    from matplotlib.axes import Axes

    lines, bands = [], []
    plot, fill = Axes.plot, Axes.fill_between

    def recording_plot(ax, xs, ys, **kw):
        lines.append((kw.get("label"), list(xs), list(ys)))
        return plot(ax, xs, ys, **kw)

    def recording_fill(ax, xs, lo, hi, **kw):
        bands.append((list(xs), list(lo), list(hi)))
        return fill(ax, xs, lo, hi, **kw)

    monkeypatch.setattr(Axes, "plot", recording_plot)
    monkeypatch.setattr(Axes, "fill_between", recording_fill)
    return lines, bands


def test_learning_curves_are_means_with_min_max_bands(tmp_path, monkeypatch):
    from fplus.report import plots_seeds

    runs = _runs(tmp_path / "runs")
    data = c.collect(runs)
    series = {r["label"]: c.train_series(Path(r["path"])) for r in data["runs"]}
    e0, e2 = data["seeds"]["groups"]
    band = plots_seeds.group_band(e0, series, "loss")  # 10 / (step / 10) + 0.1 * seed + 0.5
    assert band["steps"] == [10, 20, 30] and band["n"] == 3
    assert band["mean"] == pytest.approx([10 / st + 0.6 for st in STEPS])
    assert band["lo"] == pytest.approx([10 / st + 0.5 for st in STEPS])
    assert band["hi"] == pytest.approx([10 / st + 0.7 for st in STEPS])
    val = plots_seeds.group_band(e2, series, "val_mse_none", val=True)  # 0.25 / 0.27 / 0.23 + 0.01 * (30 - step)
    assert val["mean"] == pytest.approx([0.45, 0.35, 0.25]) and val["lo"] == pytest.approx([0.43, 0.33, 0.23])
    assert val["hi"] == pytest.approx([0.47, 0.37, 0.27])
    gate = plots_seeds.group_band(e2, series, "gate")
    assert gate["mean"] == pytest.approx([0.2 * st / 30 for st in STEPS])
    assert gate["lo"] == pytest.approx([0.1 * st / 30 for st in STEPS])
    assert plots_seeds.group_band(e0, series, "gate") is None
    # a seed that stopped early ends the band; a run without the curve is left out
    assert s.curve_band([[(10, 1.0), (20, 2.0)], [(10, 3.0)], []]) == {
        "steps": [10], "mean": [2.0], "lo": [1.0], "hi": [3.0], "n": 2}
    assert s.curve_band([[], []]) is None
    # the figures draw exactly these arrays: the mean line and the shaded band
    lines, bands = _record(monkeypatch)
    assert plots_seeds.gate_bands([e0, e2], series, tmp_path / "g.png") is not None
    assert lines == [("E2 (n=3)", [10, 20, 30], gate["mean"])] and bands == [([10, 20, 30], gate["lo"], gate["hi"])]
    lines.clear()
    bands.clear()
    assert plots_seeds.loss_bands([e0, e2], series, ["loss"], tmp_path / "l.png") is not None
    assert [label for label, _, _ in lines] == ["E0 (n=3)", "E2 (n=3)", "E0 (n=3)", "E2 (n=3)"]
    assert lines[0][2] == band["mean"] and bands[0] == ([10, 20, 30], band["lo"], band["hi"])
    assert lines[3][2] == val["mean"] and bands[3] == ([10, 20, 30], val["lo"], val["hi"])


def test_seeded_report_files(seeded):
    files, data = seeded
    names = sorted(p.name for p in files.plots)
    assert names == ["delta_vs_gate.png", "gate.png", "losses.png", "seeds-success-metaworld.png",
                     "success-metaworld.png", "world_cosine.png"]
    md = files.markdown.read_text()
    for name in ("losses.png", "gate.png", "world_cosine.png", "seeds-success-metaworld.png"):
        assert md.count(f"](plots/{name})") == 1, name
    assert "min-max band over seeds" in md
    assert files.html.read_text().count("data:image/png;base64,") == len(files.plots)


def test_single_seed_reports_read_as_before(tmp_path):
    """One run per experiment (matrix without MATRIX_SEEDS): no seed section, per-run figures, the document is the
    one build_document makes without seeds; report.json only gains keys."""
    runs = [make_seed_run(tmp_path / "runs", "E0", 0, name="E0"), make_seed_run(tmp_path / "runs", "E2", 0, name="E2")]
    files = write_report(runs, tmp_path / "report")
    data = json.loads(files.json.read_text())
    assert data["seeds"]["seeded"] is False and [g["n"] for g in data["seeds"]["groups"]] == [1, 1]
    assert seed_section(data, SeedPlots()) == []
    md = files.markdown.read_text()
    assert "Across seeds" not in md and "paired over seeds" not in md and "seeds-" not in md
    assert [r["label"] for r in data["runs"]] == ["E0", "E2"]
    plots = Plots(**{k: files.out / "plots" / f"{k}.png" for k in ("losses", "gate", "delta_vs_gate",
                                                                    "world_cosine")},
                  success={"metaworld": files.out / "plots" / "success-metaworld.png"})
    assert to_markdown(build_document(data, plots), files.out) == md
    # one seed: a stat without an interval, and the pair (n = 1) stored without one
    e2 = _group(data, "E2")
    assert e2["val_latest"]["modes"]["none"]["mse"] == {"mean": 0.25, "sd": None, "ci95": None, "n": 1, "seeds": [0],
                                                        "values": [0.25]}
    [pair] = data["seeds"]["paired"]
    assert pair["rows"][0]["values"] == pytest.approx([-0.05]) and pair["rows"][0]["ci95"] is None
    # the run records keep their keys and gain seed / split_seed
    assert {"seed", "split_seed"} <= set(data["runs"][0]) and data["runs"][0]["seed"] == 0


def _add_latency(run: Path, wins: int, boundary: float) -> None:
    """A latency section (naive, d = 2) in the run's closed-loop file: `wins` of 20 episodes, |Δa| at boundaries."""
    path = run / "eval" / "sim-metaworld-step-000030.json"
    data = json.loads(path.read_text())
    overall = {**_cell(wins, 20), "smoothness": {"boundary": boundary, "within": 0.1}, "idle_steps": 40}
    data.update(n_action_steps=4, latency={"naive": {"2": {"execution_horizon": 4, "overall": overall, "tasks": {}}}})
    path.write_text(json.dumps(data))


def test_latency_results_over_seeds(tmp_path):
    runs = _runs(tmp_path / "runs")
    for run, wins, boundary in zip(runs, (6, 6, 6, 9, 12, 15), (0.5, 0.5, 0.5, 0.6, 0.7, 0.8), strict=True):
        _add_latency(run, wins, boundary)
    files = write_report(runs, tmp_path / "report")
    data = json.loads(files.json.read_text())
    [row] = _group(data, "E2")["sim"]["metaworld"]["latency"]
    assert (row["chunking"], row["inference_delay"], row["execution_horizon"]) == ("naive", 2, 4)
    assert row["rate"]["values"] == pytest.approx([0.45, 0.6, 0.75]) and row["rate"]["successes"] == 36
    assert row["rate"]["ci95"] == pytest.approx(_ci(0.6, 0.15, T2, 3))
    assert row["boundary"]["mean"] == pytest.approx(0.7) and row["ratio"]["mean"] == pytest.approx(7.0)
    assert row["idle_per_episode"]["ci95"] == pytest.approx([2.0, 2.0])
    [pair] = data["seeds"]["paired"]
    latency = next(r for r in pair["rows"] if r["key"] == "sim.metaworld.latency.naive.2")
    assert latency["figure"] == "metaworld success (naive, d = 2)"
    assert latency["values"] == pytest.approx([0.15, 0.3, 0.45]) and latency["mean"] == pytest.approx(0.3)
    md = files.markdown.read_text()
    header, rows = _md_table(md, "E2: inference delay and chunking, all tasks, mean over seeds")
    assert header == ["chunking", "delay d", "success", "Δa boundary", "Δa within", "boundary / within",
                      "idle steps / episode"]
    assert rows == [["naive", "2", "60% [23, 97] (36/60)", "0.7 [0.4516, 0.9484]", "0.1 [0.1, 0.1]",
                     "7 [4.516, 9.484]", "2 [2, 2]"]]
    assert "plots/seeds-latency-metaworld.png" in data["plots"] and "](plots/seeds-latency-metaworld.png)" in md
