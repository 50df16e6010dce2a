"""Injected faults of training, checkpoints and run files (DESIGN 12): each one stops with a one-line FplusError
that names the file or step and what to do, or is survived; nothing of the run is lost, and a resume after it ends
with the same weights as an uninterrupted run."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from fplus import checkpoint as ckpt
from fplus.errors import FplusError
from fplus.model.corruption import MODES
from fplus.model.policy import FPlusPolicy
from fplus.rundir import METRICS, run_dir_for, run_state, settings_from_run
from fplus.settings import settings_to_environ
from fplus.train.recipe import TrainRecipe
from fplus.train.run import train_run
from fplus.train.state import TrainingInterrupted
from tests.helpers import reset_accelerate as _reset_accelerate
from tests.helpers import toy_settings

COMMON = dict(EXPERIMENT="E2", MAX_STEPS=8, SAVE_EVERY=2, BATCH_SIZE=2, KEEP_LAST=5)
REPO = str(Path(__file__).resolve().parents[2])




@pytest.fixture(scope="module")
def straight(toy, tmp_path_factory):
    """The weights of an uninterrupted run with COMMON settings."""
    s = toy_settings(toy, toy / "ds", OUTPUT_DIR=tmp_path_factory.mktemp("straight"), **COMMON)
    train_run(s, run_dir_for(s), progress_bar=False)
    _reset_accelerate()
    return weights(run_dir_for(s))


def settings(toy, tmp_path, **extra):
    values = {k: v for k, v in {**COMMON, **extra}.items() if v is not None}  # None: the default
    return toy_settings(toy, toy / "ds", OUTPUT_DIR=tmp_path / "runs", **values)


def weights(run_dir: Path, checkpoint: Path | None = None) -> dict[str, torch.Tensor]:
    last = checkpoint or ckpt.latest_valid(run_dir)
    return {**load_file(str(last / "policy/policy.safetensors")),
            **load_file(str(last / "policy/backbone_trainable.safetensors"))}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def lines(run_dir: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (run_dir / METRICS).read_text().splitlines()) if r["kind"] == kind]


def steps_of(run_dir: Path) -> list[int]:
    return [p.name for p in ckpt.list_checkpoints(run_dir)]


def no_temp(run_dir: Path) -> bool:
    return not [p for p in ckpt.checkpoint_dir(run_dir).iterdir() if p.name.startswith(".tmp-")]


def resume(s, run_dir, console=None, **kw):
    _reset_accelerate()
    return train_run(s, run_dir, resume=True, progress_bar=False, console=console, **kw)


def console() -> Console:
    return Console(record=True, width=400, force_terminal=False)


def on_training_call(monkeypatch, call: int, action):
    """Run `action(self, terms)` in FPlusPolicy.losses on the `call`-th training micro-batch (= step with
    GRAD_ACCUM 1): the fault strikes inside the step, before its backward and optimiser step."""
    original = FPlusPolicy.losses
    count = {"n": 0}

    def losses(self, batch, *args, **kwargs):
        terms, metrics = original(self, batch, *args, **kwargs)
        if self.training:
            count["n"] += 1
            if count["n"] == call:
                action(self, terms)
        return terms, metrics

    monkeypatch.setattr(FPlusPolicy, "losses", losses)


def nan_term(term: str):
    def action(policy, terms):
        terms[term] = terms[term] * float("nan")
    return action


# ----- non-finite loss / gradient -----------------------------------------------------------------------------

def test_nan_loss_stops_naming_step_and_term_keeping_the_last_good_checkpoint(toy, tmp_path, monkeypatch,
                                                                               straight):
    s = settings(toy, tmp_path)
    run_dir = run_dir_for(s)
    on_training_call(monkeypatch, 5, nan_term("l_world"))
    with pytest.raises(FplusError) as err:
        train_run(s, run_dir, progress_bar=False)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("step 5: l_world is nan (l_action ")
    assert ", l_world nan); the run is not complete; its last good checkpoint is step 4. Check the data " \
           "(fplus data info) and the latents (fplus doctor), or set NONFINITE=skip" in message
    assert run_state(run_dir) == "partial" and steps_of(run_dir) == ["step-000002", "step-000004"]
    assert all(torch.isfinite(v).all() for v in weights(run_dir).values())
    assert [r["step"] for r in lines(run_dir)] == [1, 2, 3, 4], "nothing of the failed step was logged"
    # the fault gone (the data fixed), a resume ends where an uninterrupted run ends
    monkeypatch.undo()
    assert resume(s, run_dir).step == 8
    assert same(weights(run_dir), straight)


def test_diverging_loss_from_a_huge_learning_rate_stops(toy, tmp_path):
    s = settings(toy, tmp_path, EXPERIMENT="E0", LR_HEADS=1e30, LR_BACKBONE=1e30, WARMUP_STEPS=0, SAVE_EVERY=1,
                 MAX_GRAD_NORM=1e30)
    run_dir = run_dir_for(s)
    with pytest.raises(FplusError, match=r"^step (\d+): ((loss|l_action)(, \w+)* (is|are) (nan|inf|-inf|non-finite)|"
                                         r"the gradient is non-finite \(norm \S+\)) \(l_action .*\); the run is not "
                                         r"complete; its last good checkpoint is step \d+\. Check the data") as err:
        train_run(s, run_dir, progress_bar=False)
    failed = int(str(err.value).split(":")[0].split()[1])
    assert failed > 1 and not (run_dir / "COMPLETE").exists()
    last = ckpt.list_checkpoints(run_dir)[-1]
    assert last.name == f"step-{failed - 1:06d}" and ckpt.verify(last) is None


class _InfGradient(torch.autograd.Function):
    """Identity forward (the loss stays finite), an infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_nonfinite_gradient_with_a_finite_loss_stops(toy, tmp_path, monkeypatch):
    s = settings(toy, tmp_path, EXPERIMENT="E0")
    run_dir = run_dir_for(s)

    def inf_grad(policy, terms):
        terms["l_action"] = _InfGradient.apply(terms["l_action"])

    on_training_call(monkeypatch, 3, inf_grad)
    with pytest.raises(FplusError, match=r"^step 3: the gradient is non-finite \(norm (inf|nan)\) \(l_action "
                                         r"[0-9.e-]+\); the run is not complete; its last good checkpoint is step 2"):
        train_run(s, run_dir, progress_bar=False)
    assert steps_of(run_dir) == ["step-000002"]


def test_nonfinite_skip_skips_the_batch_counts_and_logs_it_and_goes_on(toy, tmp_path, monkeypatch):
    s = settings(toy, tmp_path, NONFINITE="skip", SAVE_EVERY=1, MAX_STEPS=5)
    run_dir = run_dir_for(s)
    on_training_call(monkeypatch, 3, nan_term("l_world"))
    out = console()
    assert train_run(s, run_dir, progress_bar=False, console=out).step == 5
    assert run_state(run_dir) == "complete"
    text = out.export_text()
    assert "step 3: l_world is nan (l_action " in text
    assert "batch skipped (NONFINITE=skip; 1 skipped so far)" in text
    train = lines(run_dir)
    assert [r["skipped_nonfinite"] for r in train] == [0, 0, 1, 1, 1]
    assert [bool(r.get("skipped_step")) for r in train] == [False, False, True, False, False]
    assert train[2]["l_world"] is None and train[2]["loss"] is None, "no NaN in metrics.jsonl (not JSON)"
    assert train[2]["l_action"] is not None
    # no optimiser step at step 3: its weights are step 2's; training went on afterwards
    cps = {p.name: p for p in ckpt.list_checkpoints(run_dir)}
    assert same(weights(run_dir, cps["step-000002"]), weights(run_dir, cps["step-000003"]))
    assert not same(weights(run_dir, cps["step-000003"]), weights(run_dir, cps["step-000004"]))
    assert all(torch.isfinite(v).all() for v in weights(run_dir).values())
    # the count is part of the resumable state
    state = torch.load(cps["step-000005"] / "trainer.pt", weights_only=False)
    assert state["progress"]["skipped_nonfinite"] == 1


# ----- one writer per run directory ---------------------------------------------------------------------------

HOLDER = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from tests.helpers import toy_settings
from fplus.rundir import run_dir_for
from fplus.train.run import train_run
root = Path(sys.argv[1])
s = toy_settings(root, root / "ds", OUTPUT_DIR=sys.argv[2], EXPERIMENT="E0", MAX_STEPS=100000, SAVE_EVERY=1,
                 BATCH_SIZE=2, MAX_EPOCHS=100000)
train_run(s, run_dir_for(s), progress_bar=False)
"""


def test_a_second_train_or_resume_fails_at_once_naming_the_holder_and_a_dead_holder_is_taken_over(toy, tmp_path):
    script = tmp_path / "hold.py"
    script.write_text(HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), str(toy), str(tmp_path / "runs"), REPO],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    s = toy_settings(toy, toy / "ds", OUTPUT_DIR=tmp_path / "runs", EXPERIMENT="E0", MAX_STEPS=100000, SAVE_EVERY=1,
                     BATCH_SIZE=2, MAX_EPOCHS=100000)
    run_dir = run_dir_for(s)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and len(ckpt.list_checkpoints(run_dir)) < 2 and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        for again in (False, True):
            start = time.perf_counter()
            with pytest.raises(FplusError, match=rf"^run directory {run_dir} is in use by pid {proc.pid} on host "
                                                 rf".* \(lock file {run_dir}/\.lock\); wait for it to finish or "
                                                 "stop it first"):
                train_run(s, run_dir, resume=again, progress_bar=False)
            assert time.perf_counter() - start < 2.0, "fails at once, before any setup"
    finally:
        proc.kill()
        proc.wait()
    out = console()
    progress = resume(s, run_dir, console=out, stop_after=2)
    text = out.export_text()
    assert f"took over the lock of run directory {run_dir} from pid {proc.pid}, which is no longer running" in text
    steps = [r["step"] for r in lines(run_dir)]
    assert steps == list(range(1, progress.step + 1)), "one writer: no interleaved or repeated metric lines"
    # a holder that exits normally leaves no details: the next one reports no takeover
    assert (run_dir / ".lock").read_text() == ""
    out = console()
    resume(s, run_dir, console=out, stop_after=1)
    assert "took over" not in out.export_text()


# ----- signals ------------------------------------------------------------------------------------------------

def test_sigint_finishes_the_step_saves_says_how_to_resume_and_resume_matches(toy, tmp_path, monkeypatch,
                                                                              straight):
    s = settings(toy, tmp_path)
    run_dir = run_dir_for(s)
    on_training_call(monkeypatch, 5, lambda policy, terms: os.kill(os.getpid(), signal.SIGINT))
    before = signal.getsignal(signal.SIGINT)
    out = console()
    with pytest.raises(TrainingInterrupted) as err:
        train_run(s, run_dir, progress_bar=False, console=out, resume_hint="resume with `fplus train --resume`")
    assert err.value.code == 130
    text = out.export_text()
    assert f"SIGINT: stopped {run_dir} at step 5 of 8, checkpoint saved (step-000005); resume with `fplus train " \
           "--resume`" in text
    assert steps_of(run_dir) == ["step-000002", "step-000004", "step-000005"] and no_temp(run_dir)
    assert ckpt.verify(ckpt.list_checkpoints(run_dir)[-1]) is None and run_state(run_dir) == "partial"
    assert signal.getsignal(signal.SIGINT) is before, "the handler is restored"
    monkeypatch.undo()
    assert resume(s, run_dir).step == 8
    assert same(weights(run_dir), straight)
    assert [r["step"] for r in lines(run_dir)] == list(range(1, 9))


def test_a_second_sigint_during_the_save_aborts_at_once_without_a_partial_checkpoint(toy, tmp_path, monkeypatch):
    s = settings(toy, tmp_path, SAVE_EVERY=None)
    run_dir = run_dir_for(s)
    on_training_call(monkeypatch, 3, lambda policy, terms: os.kill(os.getpid(), signal.SIGINT))
    original = FPlusPolicy.save

    def save(self, directory, **kwargs):
        original(self, directory, **kwargs)  # the policy's files are written, the trainer state not yet
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(FPlusPolicy, "save", save)
    out = console()
    with pytest.raises(TrainingInterrupted) as err:
        train_run(s, run_dir, progress_bar=False, console=out)
    assert err.value.code == 130
    assert "second SIGINT: aborted at once at step 3; the steps after the last checkpoint are lost (no checkpoint " \
           "yet); resume it with --resume" in out.export_text()
    assert steps_of(run_dir) == [] and no_temp(run_dir)


def test_a_signal_during_setup_stops_at_once(toy, tmp_path, monkeypatch):
    s = settings(toy, tmp_path)
    original = TrainRecipe._latents

    def latents(self, ds):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(self, ds)

    monkeypatch.setattr(TrainRecipe, "_latents", latents)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as err:
        train_run(s, run_dir_for(s), progress_bar=False)
    assert err.value.code == 143
    assert err.value.message.startswith(f"SIGTERM during setup: stopped {run_dir_for(s)} before its first step")
    assert signal.getsignal(signal.SIGTERM) is before


def _cli(args, s, cwd, **popen):
    env = {k: v for k, v in os.environ.items() if k != "FPLUS_PROFILE"}
    env.update(settings_to_environ(s))
    env["PYTHONPATH"] = REPO
    env["COLUMNS"] = "400"
    return [sys.executable, "-m", "fplus.cli.main", *args], dict(env=env, cwd=cwd, text=True, **popen)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_signal_saves_prints_the_resume_command_and_exits_128_plus_the_signal(toy, tmp_path, sig):
    s = toy_settings(toy, toy / "ds", OUTPUT_DIR=tmp_path / "runs", EXPERIMENT="E0", MAX_STEPS=60, BATCH_SIZE=2,
                     MAX_EPOCHS=10)
    run_dir = run_dir_for(s)
    cmd, kw = _cli(["train", "-e", "E0"], s, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc = subprocess.Popen(cmd, **kw)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and \
            not ((run_dir / METRICS).is_file() and len((run_dir / METRICS).read_text().splitlines()) >= 2):
        time.sleep(0.02)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr[-3000:]
    name = signal.Signals(sig).name
    assert f"{name}: stopped {run_dir} at step " in stdout and "checkpoint saved (step-0000" in stdout
    assert "; resume with `fplus train -e E0 --resume`" in stdout
    assert "Traceback" not in stderr
    step = ckpt.manifest_step(ckpt.latest_valid(run_dir))
    assert 2 <= step < 60 and no_temp(run_dir)
    cmd, kw = _cli(["train", "-e", "E0", "--resume"], s, tmp_path, capture_output=True)
    done = subprocess.run(cmd, **kw)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed {run_dir} at step {step}" in done.stdout
    assert [r["step"] for r in lines(run_dir)] == list(range(1, 61))


# ----- a checkpoint that cannot be written --------------------------------------------------------------------

def _fail_on(monkeypatch, name: str, error: BaseException, partial: bool = False):
    """torch.save / safetensors save_file fail with `error` when writing a file called `name` at step 4."""
    import safetensors.torch

    originals = {"torch": torch.save, "st": safetensors.torch.save_file}

    def check(path, write):
        if isinstance(path, str | os.PathLike):
            path = Path(path)
            if path.name == name and any(p.name == ".tmp-step-000004" for p in path.parents[:2]):
                if partial:
                    path.write_bytes(b"\0" * 1000)
                raise error
        return write()

    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: check(f, lambda: originals["torch"](obj, f, *a, **k)))
    monkeypatch.setattr(safetensors.torch, "save_file",
                        lambda t, f, *a, **k: check(f, lambda: originals["st"](t, f, *a, **k)))


def test_disk_full_while_saving_names_the_file_removes_the_partial_checkpoint_and_resume_matches(
        toy, tmp_path, monkeypatch, straight):
    s = settings(toy, tmp_path)
    run_dir = run_dir_for(s)
    _fail_on(monkeypatch, "trainer.pt", OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(FplusError) as err:
        train_run(s, run_dir, progress_bar=False)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"cannot save checkpoint step 4: writing {run_dir}/checkpoints/.tmp-step-000004/"
                              "trainer.pt failed (no space left on device); ")
    assert " free now; the partial checkpoint was removed and the earlier checkpoints (step-000002) are intact; " \
           "free space on that disk (a checkpoint takes about " in message
    assert steps_of(run_dir) == ["step-000002"] and no_temp(run_dir)
    assert ckpt.verify(ckpt.list_checkpoints(run_dir)[0]) is None and run_state(run_dir) == "partial"
    monkeypatch.undo()  # space freed
    assert resume(s, run_dir).step == 8
    assert same(weights(run_dir), straight)


@pytest.mark.parametrize("name, error", [
    ("rng-0.pt", RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                              "file data/0: file write failed")),
    ("policy.safetensors", OSError(errno.ENOSPC, "No space left on device")),
])
def test_disk_full_from_torch_or_safetensors(toy, tmp_path, monkeypatch, name, error):
    s = settings(toy, tmp_path, MAX_STEPS=5)
    run_dir = run_dir_for(s)
    _fail_on(monkeypatch, name, error, partial=True)
    with pytest.raises(FplusError, match=rf"^cannot save checkpoint step 4: writing \S+/\.tmp-step-000004/"
                                         rf"(policy/)?{name} failed \((no space left on device|PytorchStreamWriter "
                                         r"failed writing file data/0: file write failed: the disk is probably "
                                         r"full)\); .* free now; the partial checkpoint was removed"):
        train_run(s, run_dir, progress_bar=False)
    assert steps_of(run_dir) == ["step-000002"] and no_temp(run_dir)


def test_stale_temporary_checkpoints_are_removed_on_resume_with_a_message(toy, tmp_path):
    s = settings(toy, tmp_path, EXPERIMENT="E0")
    run_dir = run_dir_for(s)
    train_run(s, run_dir, stop_after=3, progress_bar=False)
    stale = ckpt.checkpoint_dir(run_dir) / ".tmp-step-000004"
    (stale / "policy").mkdir(parents=True)
    (stale / "policy" / "policy.safetensors").write_bytes(b"\0" * 10)
    out = console()
    resume(s, run_dir, console=out, stop_after=1)
    assert not stale.exists()
    text = " ".join(out.export_text().split())
    assert f"removed 1 partial checkpoint(s) left by an interrupted save in {run_dir}/checkpoints: " \
           ".tmp-step-000004" in text


# ----- damaged run files --------------------------------------------------------------------------------------

@pytest.fixture
def e0_partial(toy, tmp_path):
    s = settings(toy, tmp_path, EXPERIMENT="E0", MAX_STEPS=6)
    run_dir = run_dir_for(s)
    train_run(s, run_dir, stop_after=5, progress_bar=False)  # checkpoints at 2, 4
    _reset_accelerate()
    return s, run_dir


@pytest.mark.parametrize("content, problem", [
    ('{"settings": {"EXPERIMENT": "E0",',
     r"is not valid JSON \(cut off\?\): line 1 column \d+: Expecting property name"),
    (b'{"settings": {"EXPERIMENT": "E0\xff"}}', r"is not UTF-8 text \(byte 31 is 0xff\); it is damaged"),
    ("", r"is empty"),
    ('{"policy": {}}', r"is not a run configuration \(no `settings` object\)"),
])
def test_damaged_run_config_is_named(e0_partial, content, problem):
    s, run_dir = e0_partial
    config = run_dir / "config.json"
    config.write_bytes(content if isinstance(content, bytes) else content.encode())
    pattern = rf"{re.escape(str(config))} {problem}"
    with pytest.raises(FplusError, match=pattern) as err:
        resume(s, run_dir)
    assert "\n" not in str(err.value)
    with pytest.raises(FplusError, match=pattern):
        settings_from_run(run_dir)
    from fplus.eval.offline import evaluate_run

    with pytest.raises(FplusError, match=pattern):
        evaluate_run(run_dir, ("none",))


def test_damaged_run_config_is_one_line_in_the_cli(e0_partial, tmp_path):
    s, run_dir = e0_partial
    (run_dir / "config.json").write_text('{"settings": {"EXPERIMENT": ')
    cmd, kw = _cli(["train", "-e", "E0", "--resume"], s, tmp_path, capture_output=True)
    out = subprocess.run(cmd, **kw)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    text = " ".join(out.stderr.split())
    assert f"error: the run configuration {run_dir}/config.json is not valid JSON (cut off?)" in text


def test_damaged_split_is_named(e0_partial):
    s, run_dir = e0_partial
    (run_dir / "split.json").write_text('{"train": [0, 1, 2], "val": [')
    with pytest.raises(FplusError, match=rf"the run's train/validation split {run_dir}/split.json is not valid JSON"):
        resume(s, run_dir)
    (run_dir / "split.json").write_text('{"train": [0, 1, 2]}')
    with pytest.raises(FplusError, match=rf"{run_dir}/split.json is not a train/validation split \(KeyError"):
        resume(s, run_dir)


def test_damaged_checkpoint_manifest_is_skipped_on_resume_and_named_in_eval(e0_partial):
    s, run_dir = e0_partial
    newest = ckpt.list_checkpoints(run_dir)[-1]
    (newest / "checkpoint.json").write_bytes(b'{"step": 4, "files": {"trainer.pt": "ab\xfe')
    problem = ckpt.verify(newest)
    assert problem.startswith(f"checkpoint manifest {newest}/checkpoint.json is not UTF-8 text")
    from fplus.eval.offline import evaluate_run

    with pytest.raises(FplusError, match=rf"checkpoint {newest} is unusable: checkpoint manifest {newest}/"
                                         "checkpoint.json is not UTF-8"):
        evaluate_run(run_dir, ("none",), step=4)
    (newest / "checkpoint.json").write_text('{"step": 4, "files": {"trainer.pt": "ab')
    out = console()
    assert resume(s, run_dir, console=out).step == 6
    text = " ".join(out.export_text().split())
    assert "checkpoint step-000004 is unusable (checkpoint manifest" in text and "is not valid JSON (cut off?)" in text
    assert "moved the unusable checkpoint step-000004 aside to" in text
    assert (ckpt.checkpoint_dir(run_dir) / "unusable-step-000004").is_dir()
    assert f"resumed {run_dir} at step 2" in text
    assert [r["step"] for r in lines(run_dir)] == list(range(1, 7))


def test_damaged_earlier_eval_file_is_named_before_evaluating(e0_partial):
    s, run_dir = e0_partial
    from fplus.eval.offline import evaluate_run

    _, out = evaluate_run(run_dir, ("none",))
    out.write_text('{"modes": {"none": {"mse_norm": 0.1')
    with pytest.raises(FplusError, match=rf"the earlier offline evaluation {out} is not valid JSON \(cut off\?\): .*; "
                                         r"delete it \(the evaluation writes it again\) or restore it"):
        evaluate_run(run_dir, ("none",))
    from fplus.eval.closed_loop import _earlier

    sim = run_dir / "eval" / "sim-metaworld-step-000004.json"
    sim.write_bytes(b"\x89PNG")
    with pytest.raises(FplusError, match=rf"the earlier closed-loop evaluation {sim} is not UTF-8 text"):
        _earlier(sim)


def test_no_usable_checkpoint_restarts_from_zero_and_drops_the_old_metrics(e0_partial):
    s, run_dir = e0_partial
    for cp in ckpt.list_checkpoints(run_dir):
        file = cp / "policy/policy.safetensors"
        file.write_bytes(file.read_bytes()[:-10])
    with (run_dir / METRICS).open("a") as f:
        f.write('{"step": 6, "ki')  # a line cut off by a kill
    out = console()
    assert resume(s, run_dir, console=out).step == 6
    text = " ".join(out.export_text().split())
    assert "no usable checkpoint: starting from step 0; dropped the" in text
    assert "metric line(s) of the earlier attempt from metrics.jsonl" in text
    assert [r["step"] for r in lines(run_dir)] == list(range(1, 7)), "no line of the old attempt stays"
    assert steps_of(run_dir) == ["step-000002", "step-000004", "step-000006"]
    assert sorted(p.name for p in ckpt.checkpoint_dir(run_dir).glob("unusable-*")) == \
        ["unusable-step-000002", "unusable-step-000004"]


# ----- a checkpoint from another run --------------------------------------------------------------------------

def test_an_e0_checkpoint_copied_into_an_e2_run_is_refused_and_not_reported_as_e2(toy, tmp_path):
    from fplus.eval.offline import evaluate_run
    from fplus.report.collect import collect_run

    runs = {}
    for e in ("E0", "E2"):
        s = settings(toy, tmp_path, EXPERIMENT=e, MAX_STEPS=2)
        train_run(s, run_dir_for(s), progress_bar=False)
        _reset_accelerate()
        runs[e] = (s, run_dir_for(s))
    e2 = runs["E2"][1]
    evaluate_run(e2, MODES)  # the E2 run's own evaluation of step 2
    assert collect_run(e2)["offline"] is not None
    target = ckpt.checkpoint_dir(e2) / "step-000002"
    shutil.rmtree(target)
    shutil.copytree(ckpt.checkpoint_dir(runs["E0"][1]) / "step-000002", target)
    pattern = (rf"checkpoint step-000002 is not this run's policy: {target}/policy/config.json differs from "
               rf"{e2}/config.json `policy` \(.*injection: checkpoint false, run true.*\); it was copied from another "
               "run: evaluate or resume it in its own run directory")
    with pytest.raises(FplusError, match=pattern):
        evaluate_run(e2, MODES)
    from fplus.eval.closed_loop import evaluate_closed_loop

    with pytest.raises(FplusError, match=pattern):
        evaluate_closed_loop(e2, "metaworld", None, 1, progress=False)
    collected = collect_run(e2)
    assert collected["offline"] is None
    assert collected["foreign_checkpoints"][0]["step"] == 2
    assert "injection: checkpoint false, run true" in collected["foreign_checkpoints"][0]["differs"]
    notes = " ".join(collected["notes"])
    assert f"checkpoint step-000002 is not this run's policy ({e2}/checkpoints/step-000002/policy/config.json " \
           f"differs from {e2}/config.json:" in notes
    assert "offline eval offline-step-000002.json is of that foreign checkpoint: not reported as E2" in notes
    (e2 / "COMPLETE").unlink()
    with pytest.raises(FplusError, match=r"checkpoint step-000002 is not this run's policy: .*injection: checkpoint "
                                         "false, run true"):
        resume(runs["E2"][0], e2)


# ----- several processes agree (2 CPU processes, gloo DDP) ----------------------------------------------------

DDP_FAULT = """
import os, signal, sys
repo, fault, rank = sys.argv[1:4]
sys.path.insert(0, repo)
from fplus.model.policy import FPlusPolicy
original, count = FPlusPolicy.losses, {"n": 0}
def losses(self, batch, *args, **kwargs):
    terms, metrics = original(self, batch, *args, **kwargs)
    if self.training:
        count["n"] += 1
        if count["n"] == 3 and os.environ["RANK"] == rank:
            if fault == "nan":
                terms["l_world"] = terms["l_world"] * float("nan")
            else:
                os.kill(os.getpid(), signal.SIGTERM)
    return terms, metrics
FPlusPolicy.losses = losses
from fplus.cli.main import main
sys.argv = ["fplus", "train"]
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("fault, rank, nonfinite", [("nan", "1", "error"), ("nan", "1", "skip"),
                                                    ("sigterm", "0", "error")])
def test_ddp_processes_stop_skip_or_save_at_the_same_step(toy, tmp_path, fault, rank, nonfinite):
    """A fault on one process only: every process raises, skips or saves at that step (no hang, no desync)."""
    s = toy_settings(toy, toy / "ds", OUTPUT_DIR=tmp_path / "runs", EXPERIMENT="E2", MAX_STEPS=5, BATCH_SIZE=2,
                     SAVE_EVERY=2, NONFINITE=nonfinite)
    script = tmp_path / "fault.py"
    script.write_text(DDP_FAULT)
    cmd, kw = _cli([], s, tmp_path, capture_output=True, timeout=300)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    out = subprocess.run([torchrun, "--nproc_per_node", "2", str(script), REPO, fault, rank], **kw)
    run_dir = run_dir_for(s)
    text = " ".join((out.stdout + out.stderr).split())
    if fault == "nan" and nonfinite == "error":
        assert out.returncode != 0
        # only rank 0 prints the error; it names the term that was non-finite on the other process
        assert "error: step 3: l_world is non-finite on another process" in text
        assert "l_world is nan" not in text  # rank 1's own line is not printed
        assert steps_of(run_dir) == ["step-000002"] and not (run_dir / "COMPLETE").exists()
    elif fault == "nan":
        assert out.returncode == 0, text[-3000:]
        assert [r["skipped_nonfinite"] for r in lines(run_dir)] == [0, 0, 1, 1, 1]
    else:
        assert out.returncode != 0
        assert f"SIGTERM: stopped {run_dir} at step 3 of 5, checkpoint saved (step-000003)" in text
        last = ckpt.list_checkpoints(run_dir)[-1]
        assert last.name == "step-000003" and ckpt.verify(last) is None
        assert (last / "rng-0.pt").is_file() and (last / "rng-1.pt").is_file(), "both processes saved at step 3"
        assert no_temp(run_dir)
