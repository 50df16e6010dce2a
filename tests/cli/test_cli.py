"""The executable as users run it: the help, one-line errors (printed by rank 0 only), the debug switch, and what
`fplus --help` imports.

Commands run in-process through Typer's CliRunner. A subprocess only where the process itself is the point: the
modules `fplus --help` imports (import side effects), and the interpreter's traceback under FPLUS_DEBUG=1.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fplus.cli.main import app

FPLUS = str(Path(sys.executable).with_name("fplus"))
GROUPS = ["latents", "coc", "train", "eval", "matrix", "report", "data", "doctor"]
LEAVES = [["coc", "validate"], ["coc", "generate"], ["data", "info"], ["data", "demo"], ["latents", "info"]]
HEAVY = ("torch", "transformers", "pyarrow", "av", "pydantic")
# The test process's environment minus what would change the commands (None: unset for the invocation).
UNSET = {"IMAGE_KEY": None, "INSTRUCTION_KEY": None, "FPLUS_DEBUG": None, "RANK": None}


def invoke(*args: str, env: dict | None = None):
    """`fplus ARGS` in-process; click's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, list(args), env={**UNSET, "COLUMNS": "200", **(env or {})})


def test_help_lists_every_group():
    out = invoke("--help")
    assert out.exit_code == 0
    for group in GROUPS:
        assert f" {group} " in out.stdout


def test_help_imports_nothing_heavy():
    code = ("import sys; from fplus.cli.main import app; "
            "print(','.join(m for m in ('torch','transformers','pyarrow','av','pydantic') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_fplus_help_and_every_group_help_import_nothing_heavy():
    """`fplus --help` is instant because it imports no heavy library: `-X importtime` lists every module the real
    executable imported (a fresh process is the point); each group's and subcommand's help is checked the same way."""
    out = subprocess.run([sys.executable, "-X", "importtime", FPLUS, "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    for group in GROUPS:
        assert f" {group} " in out.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "typer" in imported and "fplus" in imported  # the listing is real
    assert sorted(imported & set(HEAVY)) == []
    heavy = tuple(m for m in HEAVY if m != "pydantic")  # typer itself imports pydantic to render a command's help
    code = ("import sys\nfrom typer.main import get_command\nfrom fplus.cli.main import app\n"
            f"for args in {[[g] for g in GROUPS] + LEAVES!r}:\n"
            "    get_command(app).main([*args, '--help'], prog_name='fplus', standalone_mode=False)\n"
            f"print('HEAVY=' + ','.join(m for m in {heavy!r} if m in sys.modules))\n")
    groups = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert groups.returncode == 0, groups.stderr
    assert groups.stdout.strip().splitlines()[-1] == "HEAVY="


def test_data_info_on_the_shared_fixture(libero_fixture):
    out = invoke("data", "info", str(libero_fixture))
    assert out.exit_code == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "episodes 3" in text and "frames 48" in text and "tasks 3" in text
    for key in ("observation.images.image", "observation.images.wrist_image", "observation.state", "action"):
        assert key in text
    assert "keys: observation.images.image, observation.state, action, observation.images.wrist_image, task" in text
    for task in ("put the red bowl on the plate", "open the top drawer of the cabinet",
                 "pick up the ketchup and place it in the basket"):
        assert task in text


def test_wrong_key_fails_with_one_line_listing_keys_after_the_summary(libero_fixture):
    out = invoke("data", "info", str(libero_fixture), env={"IMAGE_KEY": "observation.images.top"})
    assert out.exit_code == 1
    assert "episodes 3" in " ".join(out.stdout.split())  # the summary is still shown, then the command fails
    err = out.stderr.strip()
    assert len(err.splitlines()) == 1
    assert "IMAGE_KEY='observation.images.top' is not in the dataset" in err
    assert "observation.images.image, observation.state, action, observation.images.wrist_image, task" in err
    out = invoke("data", "info", str(libero_fixture), "--instruction-key", "instruction")
    assert out.exit_code == 1 and "INSTRUCTION_KEY='instruction' is not in the dataset" in out.stderr


def test_debug_switch_shows_traceback(tmp_path):
    """The real executable: without FPLUS_DEBUG one line, with it the interpreter's traceback (of a DataError)."""
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    out = subprocess.run([FPLUS, "data", "info", str(tmp_path / "nope")], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr and "not found" in out.stderr
    out = subprocess.run([FPLUS, "data", "info", str(tmp_path / "nope")], capture_output=True, text=True,
                         env={**env, "FPLUS_DEBUG": "1"}, timeout=60)
    assert out.returncode == 1 and "Traceback" in out.stderr and "fplus.errors.DataError" in out.stderr


def test_unknown_profile_is_one_line_with_valid_names():
    out = invoke("data", "info", "--profile", "l40")
    assert out.exit_code == 1
    assert "unknown profile 'l40' (did you mean l40s?); valid profiles: demo, h100, l40s" in out.stderr


# -- the error handler --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [None, "0"])
def test_rank_zero_prints_the_one_line_error(tmp_path, monkeypatch, rank):
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    out = CliRunner().invoke(app, ["data", "info", str(tmp_path / "nope")], env={"FPLUS_DEBUG": None})
    assert out.exit_code == 1
    assert out.stderr.strip().splitlines() == [
        f"error: dataset '{tmp_path / 'nope'}' not found (neither a local directory nor a hub repo id like "
        "user/name)  (FPLUS_DEBUG=1 for the traceback)"]


@pytest.mark.parametrize("rank", ["1", "7"])
def test_other_ranks_exit_with_the_same_status_silently(tmp_path, monkeypatch, rank):
    monkeypatch.setenv("RANK", rank)
    out = CliRunner().invoke(app, ["data", "info", str(tmp_path / "nope")], env={"FPLUS_DEBUG": None})
    assert out.exit_code == 1 and out.stderr == ""


def test_other_exceptions_name_their_type_and_debug_lets_them_through(monkeypatch):
    import fplus.data.lerobot

    def broken(*args, **kwargs):
        raise RuntimeError("a bug [in brackets]")

    monkeypatch.setattr(fplus.data.lerobot.LeRobotDataset, "open", broken)
    out = invoke("data", "info", "some/where")
    assert out.exit_code == 1
    assert out.stderr.strip().splitlines() == [
        "error (RuntimeError): a bug [in brackets]  (FPLUS_DEBUG=1 for the traceback)"]
    debug = invoke("data", "info", "some/where", env={"FPLUS_DEBUG": "1"})
    assert isinstance(debug.exception, RuntimeError) and debug.stderr == ""


def test_usage_errors_and_exit_statuses_stay_typers():
    out = invoke("data", "info", "--no-such-option")
    assert out.exit_code == 2 and "No such option" in out.stderr and "error:" not in out.stderr
    bare = invoke("coc")  # no_args_is_help: the group's help, not an error line
    assert "validate" in bare.output and "error:" not in bare.output
