from pathlib import Path

import pytest

from fplus.errors import FplusError
from fplus.settings import (
    Settings,
    available_profiles,
    env_vars,
    load_settings,
    load_settings_with_origins,
    render_env_example,
)

REPO = Path(__file__).resolve().parents[1]
SEED_NAMES = ["DATASET", "IMAGE_KEY", "INSTRUCTION_KEY", "CACHE_DIR", "WORLD_SOURCE", "BACKBONE", "BATCH_SIZE",
              "MAX_EPOCHS", "LOG_EVERY", "COC_JSONL"]


def test_seed_environment_names_map_into_the_tree(monkeypatch):
    values = {"DATASET": "d", "IMAGE_KEY": "cam", "INSTRUCTION_KEY": "task", "CACHE_DIR": "/c",
              "WORLD_SOURCE": "vjepa", "BACKBONE": "tiny", "BATCH_SIZE": "3", "MAX_EPOCHS": "7",
              "LOG_EVERY": "2", "COC_JSONL": "coc.jsonl"}
    s = load_settings(environ=values)
    assert (s.data.dataset, s.data.image_key, s.data.instruction_key) == ("d", "cam", "task")
    assert (str(s.world.cache_dir), s.world.source, s.model.backbone) == ("/c", "vjepa", "tiny")
    assert (s.train.batch_size, s.train.max_epochs, s.train.log_every) == (3, 7, 2)
    assert str(s.coc.jsonl) == "coc.jsonl"
    assert set(SEED_NAMES) <= set(env_vars())


def test_precedence_cli_over_env_over_dotenv_over_profile(tmp_path):
    profile = tmp_path / "p.env"
    profile.write_text("BATCH_SIZE=1\nMAX_EPOCHS=1\nLOG_EVERY=1\nSEED=1\n")
    dotenv = tmp_path / ".env"
    dotenv.write_text("MAX_EPOCHS=2\nLOG_EVERY=2\nSEED=2\n")
    loaded = load_settings_with_origins(str(profile), {"SEED": 4}, environ={"LOG_EVERY": "3", "SEED": "3"},
                                        dotenv=dotenv)
    t = loaded.settings.train
    assert (t.batch_size, t.max_epochs, t.log_every, t.seed) == (1, 2, 3, 4)
    assert loaded.origins["SEED"] == "command line"
    assert loaded.origins["LOG_EVERY"] == "environment"
    assert loaded.origins["MAX_EPOCHS"] == str(dotenv)


def test_profiles_exist_and_load():
    assert {"demo", "l40s", "h100"} <= set(available_profiles())
    demo = load_settings("demo", environ={})
    assert demo.model.backbone == "tiny" and demo.data.instruction_key == "task"
    l40s = load_settings("l40s", environ={})
    assert l40s.data.dataset == "HuggingFaceVLA/libero" and l40s.data.instruction_key == "task"
    assert l40s.model.backbone == "qwen3-vl-2b"


def test_unknown_profile_lists_valid_ones_with_suggestion():
    with pytest.raises(FplusError, match=r"unknown profile 'l40'.*did you mean l40s.*demo, h100, l40s"):
        load_settings("l40", environ={})


def test_unknown_key_in_a_file_fails_with_suggestion(tmp_path):
    bad = tmp_path / "bad.env"
    bad.write_text("BATCH_SIZ=4\n")
    with pytest.raises(FplusError, match=r"unknown setting 'BATCH_SIZ'.*did you mean BATCH_SIZE"):
        load_settings(str(bad), environ={})
    dotenv = tmp_path / ".env"
    dotenv.write_text("IMAGE_KYE=x\n")
    with pytest.raises(FplusError, match="IMAGE_KYE.*did you mean IMAGE_KEY"):
        load_settings(environ={}, dotenv=dotenv)


def test_invalid_value_names_variable_and_origin():
    with pytest.raises(FplusError, match=r"WORLD_SOURCE='clip' \(from environment\)"):
        load_settings(environ={"WORLD_SOURCE": "clip"})
    with pytest.raises(FplusError, match=r"BATCH_SIZE=0 \(from command line\)"):
        load_settings(None, {"BATCH_SIZE": 0}, environ={})


def test_settings_are_frozen_and_forbid_extra():
    s = load_settings(environ={})
    with pytest.raises(Exception, match="frozen"):
        s.train.batch_size = 3  # type: ignore[misc]
    with pytest.raises(Exception, match="Extra inputs are not permitted"):
        Settings(train={"batch_sise": 3})


def test_data_keys_have_no_defaults_and_empty_means_unset():
    s = load_settings(environ={"IMAGE_KEY": ""})
    assert (s.data.image_key, s.data.action_key, s.data.instruction_key) == (None, None, None)


def test_list_values_from_comma_separated_text():
    s = load_settings(environ={"DEMO_TASKS": "reach-v3, push-v3"})
    assert s.data.demo_tasks == ["reach-v3", "push-v3"]


def test_env_example_documents_every_variable_and_is_current():
    text = (REPO / ".env.example").read_text()
    assert text == render_env_example(), "regenerate .env.example with fplus.settings.render_env_example()"
    for name in env_vars():
        assert f"# {name}=" in text


def test_profiles_only_use_known_names():
    known = set(env_vars())
    for path in (REPO / "profiles").glob("*.env"):
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                assert line.split("=", 1)[0] in known, f"{path.name}: {line}"


def test_experiments_are_named_overrides():
    from fplus.experiments import EXPERIMENTS

    flags = {e: load_settings(environ={"EXPERIMENT": e}).model for e in EXPERIMENTS}
    assert [(m.prophet, m.injection, m.coc, m.flare_align) for m in flags.values()] == [
        (False, False, False, False), (True, False, False, False), (True, True, False, False),
        (False, False, True, False), (True, True, True, True)]
    # the experiment beats the environment, the command line beats the experiment
    s = load_settings(None, {"EXPERIMENT": "E2"}, environ={"PROPHET": "false", "INJECTION": "false"})
    assert s.model.injection
    s = load_settings(None, {"EXPERIMENT": "E4", "FLARE_ALIGN": "false"}, environ={})
    assert s.model.coc and not s.model.flare_align


def test_unknown_experiment_and_inconsistent_flags():
    with pytest.raises(FplusError, match=r"unknown experiment 'E5'; valid experiments: E0, E1, E2, E3, E4"):
        load_settings(environ={"EXPERIMENT": "E5"})
    with pytest.raises(FplusError, match="INJECTION=true needs PROPHET=true"):
        load_settings(environ={"INJECTION": "true"})
