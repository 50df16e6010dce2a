import re

import numpy as np

from fplus.doctor import check_memory, run_checks
from fplus.settings import load_settings, settings_to_flat
from tests.helpers import run_cli, toy_settings, write_toy_dataset


def checks_of(settings, *experiments):
    """`run_checks` of `settings` as the matrix of `experiments` (each: the settings with its EXPERIMENT)."""
    flags = ("PROPHET", "INJECTION", "COC", "FLARE_ALIGN")  # set by each experiment (CLI values would win)
    flat = {k: v for k, v in settings_to_flat(settings).items() if v is not None and k not in flags}
    per_experiment = {e: load_settings(None, {**flat, "EXPERIMENT": e}, environ={}, dotenv=None)
                      for e in experiments}
    return run_checks(settings, per_experiment)


def test_checks_of_a_good_toy_profile(tmp_path):
    write_toy_dataset(tmp_path / "ds", lengths=(5, 6))
    s = toy_settings(tmp_path, tmp_path / "ds")
    checks = {c.name: c for c in checks_of(s, "E2")}
    assert checks["dataset"].status == "ok" and "2 episodes, 11 frames" in checks["dataset"].detail
    assert checks["dataset keys"].status == "ok"
    assert checks["latents"].status == "warn" and "fplus latents" in checks["latents"].detail
    assert checks["CoC"].status == "ok"


def test_wrong_key_and_missing_coc_fail(tmp_path):
    write_toy_dataset(tmp_path / "ds", lengths=(5,))
    s = toy_settings(tmp_path, tmp_path / "ds", IMAGE_KEY="observation.images.top")
    checks = {c.name: c for c in checks_of(s, "E3")}
    keys = checks["dataset keys"]
    assert keys.status == "fail" and "IMAGE_KEY='observation.images.top'" in keys.detail
    assert checks["CoC"].status == "fail" and "COC_JSONL unset" in checks["CoC"].detail


def test_memory_check_reports_the_largest_experiment_from_the_config():
    """l40s offline: Qwen3-VL-2B's released sizes (fplus.memory), LoRA, bf16, batch 16, 2 cameras, checkpointing;
    E4 is the largest (its CoC logits: 16 x 128 labelled tokens x 151,936 x 4 bytes x 3 = 3.48 GiB)."""
    from fplus.memory import estimate_memory

    per_experiment = {e: load_settings("l40s", {"EXPERIMENT": e}, environ={}) for e in ("E0", "E2", "E4")}
    (check,) = check_memory(per_experiment["E0"], per_experiment)
    need = {e: estimate_memory(s).gpu_total for e, s in per_experiment.items()}
    assert need["E4"] > need["E2"] > need["E0"]
    assert check.status == "ok" and check.detail.startswith(
        f"~{need['E4'] / 2**30:.1f} GiB per training process on a GPU for E4 (the largest of E0, E2, E4): ")
    assert "CoC logits 3.48 GiB" in check.detail and "2.18B params" in check.detail
    assert "lora, bf16, batch 16, 2 camera(s) at 224 px" in check.detail and "activation checkpointing" in check.detail
    full = load_settings("l40s", {"EXPERIMENT": "E2", "FINETUNE": "full", "BATCH_SIZE": 32}, environ={})
    assert estimate_memory(full).gpu_total > 2 * need["E2"]


def test_memory_check_of_an_uncached_backbone_says_so(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    (check,) = check_memory(load_settings("l40s", {"BACKBONE": "qwen3-vl-8b"}, environ={}), {})
    assert check.status == "warn" and check.detail == (
        "not estimated: the config of Qwen/Qwen3-VL-8B-Instruct is not in the local hub cache (download the backbone "
        "once, or set BACKBONE to a local directory); at least 33 GiB for the float32 weights of its ~8.8B parameters")


def test_cli_exit_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = run_cli("doctor", "--profile", "l40s", env={"HF_HUB_OFFLINE": "1"})
    assert out.exit_code == 1 and "check(s) failed" in out.stdout and "dataset" in out.stdout
    # offline, the hub dataset cannot be opened, and l40s has no COC_JSONL with MATRIX_MISSING_COC=error
    summary = re.search(r"^(\d+) check\(s\) failed: (.+)$", out.stdout, re.MULTILINE)
    assert summary, out.stdout
    failed = summary.group(2).split(", ")
    assert int(summary.group(1)) == len(failed) and {"dataset", "CoC"} <= set(failed)
    assert "GiB per training process on a GPU for E4 (the largest of E0, E2, E4)" in out.stdout


def test_simulator_check_names_the_install_command(tmp_path, monkeypatch):
    from fplus.sim import libero

    write_toy_dataset(tmp_path / "ds", lengths=(5,))
    checks = {c.name: c for c in checks_of(toy_settings(tmp_path, tmp_path / "ds", EVAL_SIM="metaworld"), "E0")}
    assert checks["sim metaworld"].status == "ok"
    monkeypatch.setattr(libero, "installed_distribution", lambda: None)
    s = toy_settings(tmp_path, tmp_path / "ds", EVAL_SIM="libero", EVAL_SUITE="libero_goal")
    check = {c.name: c for c in checks_of(s, "E0")}["sim libero"]
    assert check.status == "fail" and 'pip install -e ".[libero]"' in check.detail
    assert "sim none" not in {c.name for c in checks_of(toy_settings(tmp_path, tmp_path / "ds"))}


def _latents_check(tmp_path, monkeypatch, latents):
    from fplus.doctor import check_latents
    from fplus.world import cache

    ds = write_toy_dataset(tmp_path / "ds", lengths=(5, 6))
    assert latents.shape[0] == ds.num_frames
    monkeypatch.setattr(cache, "find_latents", lambda *args: (tmp_path / "entry", latents))
    [check] = check_latents(toy_settings(tmp_path, tmp_path / "ds"), ds, needs_world=True)
    return check


def test_degenerate_latents_warn_with_the_numbers(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    constant = np.full(8, 2.0)  # norm 5.66, like the audited demo latents
    check = _latents_check(tmp_path, monkeypatch, (constant + 0.01 * rng.normal(size=(11, 8))).astype(np.float16))
    assert check.name == "latents" and check.status == "warn"
    d = check.detail
    assert d.startswith(f"{tmp_path / 'entry'}: 11 x 8: degenerate latents")
    assert re.search(r"between-frame std 0\.0\d+ against a mean norm of 5\.66 \(ratio 0\.00\d+ < 0\.05\)", d), d
    assert re.search(r"cosine 1\.0000 between random frames, 1\.0000 between consecutive frames", d), d
    assert "standardises the latents per dimension with the training split's statistics" in d
    assert "cosine targets on the raw latents are trivial" in d


def test_spread_latents_are_ok_with_the_ratio(tmp_path, monkeypatch):
    latents = np.random.default_rng(1).normal(size=(11, 8)).astype(np.float16)
    check = _latents_check(tmp_path, monkeypatch, latents)
    from fplus.world.stats import latent_spread

    ratio = latent_spread(latents)["ratio"]
    assert check.status == "ok" and ratio > 1
    assert check.detail == (f"{tmp_path / 'entry'}: 11 x 8, spread ratio {ratio:.3g} (between-frame std / mean norm; "
                            "degenerate below 0.05)")


def test_loss_paths_check_passes_the_shipped_profiles_and_names_a_bad_align_layer():
    from fplus.doctor import check_loss_paths
    from fplus.settings import matrix_settings

    for profile in ("demo", "l40s", "h100"):
        [check] = check_loss_paths(*matrix_settings(profile, environ={}, dotenv=None))
        assert check.status == "ok", check.detail
    [bad] = check_loss_paths(*matrix_settings("l40s", {"LORA_LAYERS": 8}, environ={}, dotenv=None))
    assert bad.status == "fail"
    assert "E4: ALIGN_LAYER=14 is below the first LoRA layer 21 (LORA_LAYERS=8 of 28)" in bad.detail
