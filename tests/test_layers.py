"""The import contracts of DESIGN 10 hold: `lint-imports` (import-linter) passes with the contracts in pyproject.toml.

The contracts ([tool.importlinter]): the layers cli -> matrix/doctor -> eval/deploy -> train -> ... -> errors, every
module directly under fplus/ placed in a layer; report, rundir, checkpoint, settings, experiments, io and errors never
import torch, not even indirectly; the library never imports fplus.cli; no import cycle between sibling modules.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    lint_imports = Path(sys.executable).with_name("lint-imports")
    if not lint_imports.is_file():
        pytest.fail(f"{lint_imports} not found: install the dev extra (pip install -e '.[dev]') for import-linter")
    result = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"lint-imports exited {result.returncode}; its output:\n{output}"
    assert "0 broken" in output, output
