import os
import subprocess
import sys
from pathlib import Path

from fplus.doctor import estimate_memory_gib, run_checks
from fplus.settings import load_settings
from tests.helpers import toy_settings, write_toy_dataset


def test_checks_of_a_good_toy_profile(tmp_path):
    write_toy_dataset(tmp_path / "ds", lengths=(5, 6))
    s = toy_settings(tmp_path, tmp_path / "ds")
    checks = {c.name: c for c in run_checks(s, needs_world=True, needs_coc=False)}
    assert checks["dataset"].status == "ok" and "2 episodes, 11 frames" in checks["dataset"].detail
    assert checks["dataset keys"].status == "ok"
    assert checks["latents"].status == "warn" and "fplus latents" in checks["latents"].detail
    assert checks["CoC"].status == "ok"


def test_wrong_key_and_missing_coc_fail(tmp_path):
    write_toy_dataset(tmp_path / "ds", lengths=(5,))
    s = toy_settings(tmp_path, tmp_path / "ds", IMAGE_KEY="observation.images.top")
    checks = {c.name: c for c in run_checks(s, needs_world=False, needs_coc=True)}
    keys = checks["dataset keys"]
    assert keys.status == "fail" and "IMAGE_KEY='observation.images.top'" in keys.detail
    assert checks["CoC"].status == "fail" and "COC_JSONL unset" in checks["CoC"].detail


def test_memory_estimate_grows_with_batch_and_full_finetuning():
    lora = load_settings("l40s", environ={})
    full = load_settings("l40s", {"FINETUNE": "full", "BATCH_SIZE": 32}, environ={})
    a, _ = estimate_memory_gib(lora)
    b, how = estimate_memory_gib(full)
    assert 3 < a < b and "2.1B params" in how


def test_cli_exit_code(tmp_path):
    fplus = str(Path(sys.executable).with_name("fplus"))
    out = subprocess.run([fplus, "doctor", "--profile", "l40s"], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}, timeout=120)
    assert out.returncode == 1 and "check(s) failed" in out.stdout and "dataset" in out.stdout


def test_simulator_check_names_the_install_command(tmp_path, monkeypatch):
    from fplus.sim import libero

    write_toy_dataset(tmp_path / "ds", lengths=(5,))
    checks = {c.name: c for c in run_checks(toy_settings(tmp_path, tmp_path / "ds", EVAL_SIM="metaworld"),
                                            needs_world=False, needs_coc=False)}
    assert checks["sim metaworld"].status == "ok"
    monkeypatch.setattr(libero, "installed_distribution", lambda: None)
    s = toy_settings(tmp_path, tmp_path / "ds", EVAL_SIM="libero", EVAL_SUITE="libero_goal")
    check = {c.name: c for c in run_checks(s, needs_world=False, needs_coc=False)}["sim libero"]
    assert check.status == "fail" and 'pip install -e ".[libero]"' in check.detail
    assert "sim none" not in {c.name for c in run_checks(toy_settings(tmp_path, tmp_path / "ds"), False, False)}
