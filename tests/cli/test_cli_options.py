"""Shared option types (one name, help and default each), what the commands pass on when an option is not given,
and SIGTERM raised as a KeyboardInterrupt (`fplus.signals`) with the exit status of its signal."""

from __future__ import annotations

import os
import signal
from collections import defaultdict

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from fplus.cli.main import app

CAM = "observation.images.image"


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, list(args), env={"FPLUS_DEBUG": None, "RANK": None, "COLUMNS": "200",
                                                    **(env or {})})


def commands(group=None, path=()):
    """(path, click command) of every command, group callbacks (`fplus latents`) included."""
    group = group or get_command(app)
    for name, cmd in group.commands.items():
        yield (*path, name), cmd
        if isinstance(cmd, typer.core.TyperGroup):
            yield from commands(cmd, (*path, name))


def options_by_name() -> dict[str, list[tuple[tuple[str, ...], str | None, object]]]:
    found = defaultdict(list)
    for path, cmd in commands():
        for param in cmd.params:
            if param.param_type_name == "option":
                found[max(param.opts, key=len)].append((path, param.help, param.default))
    return found


@pytest.mark.parametrize(("option", "where"), [
    ("--device", {("coc", "generate"), ("eval",), ("latents",)}),
    ("--experiment", {("train",), ("eval",)}),
    ("--max-steps", {("train",), ("matrix",), ("eval",), ("data", "demo")}),
    ("--dataset", {("latents",), ("coc", "validate"), ("coc", "generate")}),
    ("--max-tokens", {("coc", "validate"), ("coc", "generate")}),
    ("--backbone", {("coc", "validate"), ("coc", "generate")}),
    ("--profile", None),
])
def test_a_repeated_option_has_one_help_and_one_default(option, where):
    uses = options_by_name()[option]
    if where is not None:
        assert where <= {path for path, _, _ in uses}
    shared = [(help_, default) for path, help_, default in uses
              if option != "--max-steps" or path in (("train",), ("matrix",))]  # eval/demo: steps of an episode
    assert len(set(shared)) == 1, uses
    assert shared[0][1] is None  # not given: the setting (or auto) decides


def test_device_not_given_is_auto_for_latents(libero_fixture, tmp_path, monkeypatch):
    import torch

    import fplus.world.encoders

    seen = []

    def build_encoder(*args, device, **kwargs):
        seen.append(device)
        raise RuntimeError("stop here")

    monkeypatch.setattr(fplus.world.encoders, "build_encoder", build_encoder)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = ("latents", "--dataset", str(libero_fixture), "--image-key", CAM, "--cache-dir", str(tmp_path))
    assert invoke(*args).exit_code == 1
    assert invoke(*args, "--device", "cpu").exit_code == 1
    assert seen == ["cuda", "cpu"]


def test_eval_passes_device_none_and_every_mode_by_default(tmp_path, monkeypatch):
    """--device not given: None, so the run's EVAL_DEVICE applies; --corruption not given: all modes (no setting)."""
    import fplus.eval.closed_loop
    import fplus.eval.offline
    from fplus.eval.closed_loop import CLOSED_LOOP_MODES
    from fplus.model.corruption import MODES

    seen = []

    def evaluate_run(run, modes, step=None, batch_size=None, max_batches=None, device=None):
        seen.append(("offline", modes, device))
        return {}, run / "eval" / "offline.json"

    def evaluate_closed_loop(run, sim, tasks, episodes, modes, *args, device=None, **kwargs):
        seen.append((sim, modes, device))
        return {}, run / "eval" / "sim.json"

    monkeypatch.setattr(fplus.eval.offline, "evaluate_run", evaluate_run)
    monkeypatch.setattr(fplus.eval.offline, "results_table", lambda result: "table")
    monkeypatch.setattr(fplus.eval.closed_loop, "evaluate_closed_loop", evaluate_closed_loop)
    monkeypatch.setattr(fplus.eval.closed_loop, "results_table", lambda result: "table")
    env = {"CORRUPTION": "none", "EVAL_DEVICE": "cuda:3"}  # neither is the command's to read
    assert invoke("eval", str(tmp_path), env=env).exit_code == 0
    assert invoke("eval", str(tmp_path), "--corruption", "zero, none", "--device", "cpu", env=env).exit_code == 0
    out = invoke("eval", str(tmp_path), "--sim", "metaworld", "--episodes", "1", "--corrupted-episodes", "1", env=env)
    assert out.exit_code == 0, out.output
    assert seen == [("offline", MODES, None), ("offline", ("zero", "none"), "cpu"),
                    ("metaworld", CLOSED_LOOP_MODES, None)]


def test_coc_generate_passes_device_none(tmp_path, monkeypatch):
    import fplus.coc.generate

    seen = []
    monkeypatch.setattr(fplus.coc.generate, "generate_labels", lambda *a, device, **k: seen.append(device))
    out_file = str(tmp_path / "coc.jsonl")
    assert invoke("coc", "generate", "--dataset", "x", "--out", out_file).exit_code == 0
    assert invoke("coc", "generate", "--dataset", "x", "--out", out_file, "--device", "auto").exit_code == 0
    assert seen == [None, "auto"]


# -- fplus.signals -----------------------------------------------------------------------------------------------


def test_sigterm_raises_terminated_inside_the_block_only():
    from fplus.signals import Terminated, signal_exit, sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as err, sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs as soon as the call returns
    assert isinstance(err.value, KeyboardInterrupt)
    assert signal_exit(err.value) == ("SIGTERM", 143)
    assert signal.getsignal(signal.SIGTERM) is before


def test_signal_exit_of_plain_and_library_interrupts():
    from fplus.signals import exit_status, signal_exit

    assert signal_exit(KeyboardInterrupt()) == ("SIGINT", 130)
    interrupted = KeyboardInterrupt()
    interrupted.signum = signal.SIGTERM
    assert signal_exit(interrupted) == ("SIGTERM", 143)
    assert exit_status(signal.SIGKILL) == 137
