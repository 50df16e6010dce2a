"""fplus matrix: idempotent, resumable pipeline over experiments."""

import pytest
from rich.console import Console

from fplus.errors import FplusError
from fplus.matrix import run_matrix
from fplus.settings import settings_to_flat
from tests.helpers import toy_settings, write_toy_dataset


def profile_file(tmp_path, **extra):
    write_toy_dataset(tmp_path / "ds", lengths=(8, 7, 9, 6, 8))
    flat = settings_to_flat(toy_settings(tmp_path, tmp_path / "ds", MAX_STEPS=3, **extra))
    path = tmp_path / "toy.env"
    path.write_text("".join(f"{k}={','.join(v) if isinstance(v, list) else v}\n"
                            for k, v in flat.items() if v is not None))
    return str(path)


def test_matrix_runs_once_then_reports_everything_complete(tmp_path):
    profile = profile_file(tmp_path, MATRIX_EXPERIMENTS="E0,E2,E4", MATRIX_MISSING_COC="skip")
    console = Console(record=True, width=200)
    first = run_matrix(profile, console=console)
    assert first.runs == {"E0": "trained", "E2": "trained", "E4": "skipped"} and first.did_work
    assert "warning: skipping E4: no CoC labels" in console.export_text()
    for e in ("E0", "E2"):
        assert (tmp_path / "runs" / e / "COMPLETE").is_file()
        assert (tmp_path / "runs" / e / "eval" / "offline-step-000003.json").is_file()
    assert (tmp_path / "runs" / "report" / "report.html").is_file()
    second = run_matrix(profile, console=Console(record=True))
    assert second.runs == {"E0": "complete", "E2": "complete", "E4": "skipped"} and not second.did_work


def test_missing_coc_is_an_error_by_default(tmp_path):
    profile = profile_file(tmp_path, MATRIX_EXPERIMENTS="E4")
    with pytest.raises(FplusError, match="E4 needs CoC labels: COC_JSONL is unset"):
        run_matrix(profile, console=Console(record=True))


def test_missing_simulator_fails_before_any_training(tmp_path, monkeypatch):
    from fplus.sim import libero

    monkeypatch.setattr(libero, "installed_distribution", lambda: None)
    profile = profile_file(tmp_path, MATRIX_EXPERIMENTS="E0", EVAL_SIM="libero")
    with pytest.raises(FplusError, match=r"LIBERO is not installed .*\.\[libero\]"):
        run_matrix(profile, console=Console(record=True))
    assert not (tmp_path / "runs").exists()


def test_matrix_seeds_run_each_experiment_once_per_seed(tmp_path):
    import json

    profile = profile_file(tmp_path, MATRIX_EXPERIMENTS="E0")
    first = run_matrix(profile, console=Console(record=True), seeds=[0, 1])
    assert first.runs == {"E0-seed0": "trained", "E0-seed1": "trained"}
    losses = {}
    for seed in (0, 1):
        run = tmp_path / "runs" / f"E0-seed{seed}"
        config = json.loads((run / "config.json").read_text())
        assert config["settings"]["SEED"] == seed and config["settings"]["EXPERIMENT"] == "E0"
        assert config["policy"]["init_seed"] == seed
        losses[seed] = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                        if json.loads(line)["kind"] == "train"]
    assert losses[0] != losses[1]  # the seed reaches initialisation and sampling
    assert not (tmp_path / "runs" / "E0").exists()
    again = run_matrix(profile, console=Console(record=True), seeds=[0, 1])
    assert again.runs == {"E0-seed0": "complete", "E0-seed1": "complete"} and not again.did_work


def test_matrix_seeds_must_be_distinct(tmp_path):
    profile = profile_file(tmp_path, MATRIX_EXPERIMENTS="E0")
    with pytest.raises(FplusError, match=r"MATRIX_SEEDS must list distinct seeds"):
        run_matrix(profile, console=Console(record=True), seeds=[1, 1])
