"""`fplus coc validate` / `fplus coc generate`: exit codes, line-numbered reports, the generate -> validate round trip.

The commands run in-process through Typer's CliRunner (a subprocess would pay the torch import each time), the
one-line error of a refused overwrite included.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fplus.cli.main import app
from tests.data.test_coc import FAULTY, write_lines, write_motion_dataset


def invoke(*args: str):
    """Run `fplus ARGS` in-process; returns click's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "FPLUS_DEBUG": None, "FPLUS_PROFILE": None,
                                                    "RANK": None, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_motion_dataset(tmp_path_factory.mktemp("coc_cli") / "ds").root


def test_validate_reports_faults_with_line_numbers_and_fails(tmp_path, dataset):
    path = write_lines(tmp_path / "bad.jsonl", FAULTY)
    args = ("coc", "validate", str(path), "--dataset", str(dataset), "--backbone", "tiny", "--max-tokens", "40")
    out = invoke(*args, "--json")
    assert out.exit_code == 1, out.output
    report = json.loads(out.stdout)
    kinds = {(e["line"], e["kind"]) for e in report["errors"]}
    for expected in [(2, "json"), (3, "schema"), (4, "duplicate"), (5, "empty"), (6, "too_long"),
                     (7, "unknown_episode")]:
        assert expected in kinds
    assert report["coverage"]["missing_compact"] == "1, 3" and report["tokens"]["tokenizer"] == "tiny"

    human = invoke(*args)
    assert human.exit_code == 1
    text = " ".join(human.stdout.split())
    for line, kind in [(2, "json"), (3, "schema"), (4, "duplicate"), (5, "empty"), (6, "too_long"),
                       (7, "unknown_episode")]:
        assert f"│ {line} │ {kind} " in text
    assert "│ 4 │ duplicate │ episode 0 already labelled on line 1" in text
    assert "2 of 5 dataset episodes have no label: 1, 3" in text and "11 error(s)" in text


def test_generate_then_validate_round_trip(tmp_path, dataset, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no .env of the checkout
    out_file = tmp_path / "labels" / "coc.jsonl"
    gen = invoke("coc", "generate", "--dataset", str(dataset), "--out", str(out_file), "--action-key", "action",
                 "--state-key", "observation.state", "--backbone", "tiny")
    assert gen.exit_code == 0, gen.output
    text = " ".join(gen.stdout.split())
    assert "wrote" in text and "5 labels" in text and "approach > grasp > move > release" in text
    validate = ("coc", "validate", str(out_file), "--dataset", str(dataset), "--backbone", "tiny",
                "--require-full-coverage")
    val = invoke(*validate)
    assert val.exit_code == 0, val.output
    assert "coverage 5/5 episodes (100.0%)" in " ".join(val.stdout.split())
    report = json.loads(invoke(*validate, "--json").stdout)
    assert report["ok"] and report["coverage"]["fraction"] == 1.0 and report["tokens"]["max"] <= 128

    again = invoke("coc", "generate", "--dataset", str(dataset), "--out", str(out_file), "--action-key", "action")
    assert again.exit_code == 1 and len(again.stderr.strip().splitlines()) == 1
    assert "already exists; pass --overwrite" in again.stderr
