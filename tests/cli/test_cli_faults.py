"""What users see for injected faults: one-line settings errors, the misspelt-variable warning, CoC files that are
far too big, and text with Rich markup characters (`[libero]`) printed intact.

In-process through Typer's CliRunner, except the misspelt-variable warnings: they are printed once per process, so
each check gets a fresh process (the real executable).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

from typer.testing import CliRunner

from fplus.cli.main import app

FPLUS = str(Path(sys.executable).with_name("fplus"))
WARNING = "warning: environment variable"
NO_SETTINGS = ("FPLUS_DEBUG", "FPLUS_PROFILE", "FPLUS_NO_ENV_CHECK", "RANK")


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real executable with the test process's (realistic, settings-free) environment plus `env`."""
    full = {k: v for k, v in os.environ.items() if k not in NO_SETTINGS}
    full.update({"HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})})
    return subprocess.run([FPLUS, *args], capture_output=True, text=True, env=full, cwd=cwd, timeout=120)


def invoke(*args: str, env: dict[str, str] | None = None):
    """`fplus ARGS` in-process, with the settings-free environment of `run`; click's Result."""
    return CliRunner().invoke(app, list(args), env={**dict.fromkeys(NO_SETTINGS), "HF_HUB_OFFLINE": "1",
                                                    "COLUMNS": "300", **(env or {})})


def flat(text: str) -> str:
    return " ".join(text.split())


# -- settings files and the environment ----------------------------------------------------------------------------


def test_unparsable_profile_line_is_one_error_line_with_brackets_intact(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    profile = tmp_path / "bad.env"
    profile.write_text("SEED=1\nIMAGE_KEY [observation.images.image]\n")
    out = invoke("data", "info", "--profile", str(profile))
    assert out.exit_code == 1 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert (f"error: {profile}:2: cannot parse 'IMAGE_KEY [observation.images.image]': no '=' after IMAGE_KEY; "
            "write KEY=VALUE") in lines[0]


def test_non_utf8_dotenv_is_one_error_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_bytes(b"SEED=1\nRUN_NAME=caf\xe9\n")
    out = invoke("data", "info")
    assert out.exit_code == 1 and "Traceback" not in out.stderr and "UnicodeDecodeError" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: .env:2: not UTF-8 text (byte 0xe9 at column 13); save the file as UTF-8  (FPLUS_DEBUG=1 for the "
        "traceback)"]


def test_misspelt_environment_variable_warns_once_on_stderr(tmp_path):
    out = run("data", "info", cwd=tmp_path, env={"BATCH_SIZ": "2", "WORLD_SOURC": "vjepa"})
    warnings = [line for line in out.stderr.splitlines() if WARNING in line]
    assert warnings == [
        "fplus: warning: environment variable BATCH_SIZ is not a setting and is ignored (did you mean BATCH_SIZE?); "
        "FPLUS_NO_ENV_CHECK=1 turns this check off",
        "fplus: warning: environment variable WORLD_SOURC is not a setting and is ignored (did you mean "
        "WORLD_SOURCE?); FPLUS_NO_ENV_CHECK=1 turns this check off"]
    assert "no dataset given" in out.stderr  # the command itself goes on as before
    quiet = run("data", "info", cwd=tmp_path, env={"BATCH_SIZ": "2", "FPLUS_NO_ENV_CHECK": "1"})
    assert WARNING not in quiet.stderr


def test_the_real_environment_does_not_warn(tmp_path):
    env = {"CUDA_VISIBLE_DEVICES": "0", "HF_HOME": str(tmp_path), "MUJOCO_GL": "egl", "OMP_NUM_THREADS": "2",
           "PYTHONPATH": "", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "29500", "LANG": "C.UTF-8"}
    out = run("data", "info", "--profile", "demo", str(tmp_path / "none"), cwd=tmp_path, env=env)
    assert WARNING not in out.stderr, out.stderr


# -- Rich markup -------------------------------------------------------------------------------------------------


def test_doctor_prints_the_libero_install_hint_intact(monkeypatch):
    import fplus.sim.libero

    monkeypatch.setattr(fplus.sim.libero, "installed_distribution", lambda: None)
    out = invoke("doctor")
    text = flat(out.stdout)
    assert 'pip install -e ".[libero]"' in text, out.stdout


def test_doctor_prints_markup_characters_of_checks_literally(monkeypatch):
    import fplus.doctor
    from fplus.doctor import Check

    checks = [Check("[x] name", "fail", "see [bold]this[/bold], .[libero] and :thumbs_up:"),
              Check("ok one", "ok", "[/]")]
    monkeypatch.setattr(fplus.doctor, "run_checks", lambda *a, **k: checks)
    out = invoke("doctor", "--profile", "demo")
    assert out.exit_code == 1
    text = flat(out.stdout)
    assert "[x] name" in text and "see [bold]this[/bold], .[libero] and :thumbs_up:" in text and "[/]" in text
    assert "1 check(s) failed: [x] name" in text


def test_coc_validate_prints_markup_characters_literally(tmp_path):
    path = tmp_path / "coc.jsonl"
    path.write_text(json.dumps({"episode_index": 0, "coc_text": "x", "[red]note[/red]": 1}) + "\n")
    out = invoke("coc", "validate", str(path), "--no-dataset", "--backbone", "tiny")
    assert out.exit_code == 1
    assert "unknown field(s) ['[red]note[/red]']" in flat(out.stdout)


# -- CoC files ---------------------------------------------------------------------------------------------------


def test_coc_validate_rejects_a_20mb_line_unread(tmp_path):
    path = tmp_path / "huge.jsonl"
    with path.open("wb") as f:
        f.write(b'{"episode_index": 0, "coc_text": "fine"}\n{"episode_index": 1, "coc_text": "')
        for _ in range(20):
            f.write(b"x" * 2**20)
        f.write(b'"}\n')
    out = invoke("coc", "validate", str(path), "--no-dataset", "--backbone", "tiny")
    assert out.exit_code == 1
    text = flat(out.stdout)
    assert "│ 2 │ line_too_long │ line of 20,971,556 bytes, over the 65,536-byte limit of a CoC line" in text
    tracemalloc.start()  # the second run (modules and tokenizer loaded): the 20 MiB line never reaches memory
    try:
        out = invoke("coc", "validate", str(path), "--no-dataset", "--backbone", "tiny", "--json")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    report = json.loads(out.stdout)
    assert [(e["line"], e["kind"]) for e in report["errors"]] == [(2, "line_too_long")] and report["labels"] == 1


def test_coc_validate_of_a_binary_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 4096)
    out = invoke("coc", "validate", str(path), "--no-dataset", "--backbone", "tiny", "--json")
    assert out.exit_code == 1
    errors = json.loads(out.stdout)["errors"]
    assert errors[0]["line"] == 1 and errors[0]["kind"] in ("json", "line_too_long")
    assert [e["kind"] for e in errors[-2:]] == ["no_labels", "truncated"] and len(errors) == 1002  # bounded
