"""Injected faults of profiles, `.env` files and the environment: each is one FplusError line (or one warning line)
that names the file, the line and what to do."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import fplus.envfile as settings_module
from fplus.envfile import NO_ENV_CHECK_ENV, edit_distance, env_near_misses, parse_env_text, read_env_file
from fplus.errors import FplusError
from fplus.settings import env_vars, load_settings, load_settings_with_origins


@pytest.fixture(autouse=True)
def _fresh_env_check(monkeypatch):
    """Every test starts with nothing warned yet, no opt-out and rank 0."""
    monkeypatch.setattr(settings_module, "_ENV_WARNED", set())
    monkeypatch.delenv(NO_ENV_CHECK_ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and "\r" not in message, message
    return message


# -- unparsable lines --------------------------------------------------------------------------------------------

UNPARSABLE = [
    ("BATCH_SIZE=2\nMAX_EPOCHS 3\n", 2, "'MAX_EPOCHS 3': no '=' after MAX_EPOCHS"),
    ("# a comment\n\nSEED\n", 3, "'SEED': no '=' after SEED"),
    ("export LOG_EVERY\n", 1, "no '=' after LOG_EVERY"),
    ("BATCH_SIZE=2\n=4\n", 2, "'=4': a line must start with a name"),
    ("BATCH-SIZE=2\n", 1, "'BATCH-SIZE' is not a valid name"),
    ("1SEED=2\n", 1, "'1SEED' is not a valid name"),
    ("RUN_NAME='open\nSEED=1\n", 1, "the single-quoted value of RUN_NAME is never closed"),
    ('SEED=1\nRUN_NAME="open\n', 2, "the double-quoted value of RUN_NAME is never closed"),
    ('RUN_NAME="a" b\n', 1, "text after the closing quote of RUN_NAME"),
    ("SEED=1\r\nMAX_EPOCHS 3\r\n", 2, "no '=' after MAX_EPOCHS"),
    ('RUN_NAME="two\nlines"\nBAD LINE\n', 3, "'BAD LINE': no '=' after BAD"),
]


@pytest.mark.parametrize(("text", "line", "why"), UNPARSABLE)
def test_unparsable_profile_line_names_file_line_and_text(tmp_path, text, line, why):
    profile = write(tmp_path / "p.env", text)
    with pytest.raises(FplusError) as err:
        load_settings(str(profile), environ={}, dotenv=None)
    message = one_line(err)
    assert message.startswith(f"{profile}:{line}: cannot parse ")
    assert why in message and "write KEY=VALUE" in message


def test_unparsable_dotenv_line_is_an_error_not_a_dropped_line(tmp_path, capsys):
    dotenv = write(tmp_path / ".env", "SEED=3\nBATCH_SIZE 4\nLOG_EVERY=2\n")
    with pytest.raises(FplusError, match=re.escape(f"{dotenv}:2: cannot parse 'BATCH_SIZE 4': no '=' after")):
        load_settings(environ={}, dotenv=dotenv)
    assert "python-dotenv" not in capsys.readouterr().err  # our error, not python-dotenv's warning


def test_unknown_key_names_its_line(tmp_path):
    profile = write(tmp_path / "p.env", "SEED=1\n\n# c\nBATCH_SIZ=4\n")
    with pytest.raises(FplusError, match=re.escape(f"unknown setting 'BATCH_SIZ' in profile {profile}:4 (did you mean "
                                                   "BATCH_SIZE?)")):
        load_settings(str(profile), environ={}, dotenv=None)
    dotenv = write(tmp_path / ".env", 'RUN_NAME="a\nb"\nIMAGE_KYE=x\n')
    with pytest.raises(FplusError, match=re.escape(f"unknown setting 'IMAGE_KYE' in {dotenv}:3 (did you mean")):
        load_settings(environ={}, dotenv=dotenv)


def test_long_unparsable_line_is_shown_shortened(tmp_path):
    profile = write(tmp_path / "p.env", "RUN_NAME " + "x" * 500 + "\n")
    with pytest.raises(FplusError) as err:
        load_settings(str(profile), environ={}, dotenv=None)
    assert "..." in one_line(err) and len(str(err.value)) < 300


def test_valid_dotenv_syntax_is_accepted_like_python_dotenv(tmp_path):
    text = ("\ufeff# comment\n"
            "export SEED=3\n"
            "  LOG_EVERY = 7   # trailing comment\n"
            "RUN_NAME='it\\'s # not a comment'\n"
            'OUTPUT_DIR="${HOME_DIR}/runs"\n'
            "CACHE_DIR=${NOPE:-cache}/latents\n"
            "DATASET=a#b\n"
            "STATE_KEY= # empty\n"
            'DINO_MODEL="multi\nline"\r\n'
            "\n")
    values = parse_env_text(text, "x.env", {"HOME_DIR": "/h"})
    assert values == {"SEED": "3", "LOG_EVERY": "7", "RUN_NAME": "it's # not a comment", "OUTPUT_DIR": "/h/runs",
                      "CACHE_DIR": "cache/latents", "DATASET": "a#b", "STATE_KEY": "", "DINO_MODEL": "multi\nline"}
    profile = write(tmp_path / "ok.env", "export SEED=3\nLOG_EVERY=7 # c\n")
    s = load_settings(str(profile), environ={}, dotenv=None)
    assert (s.train.seed, s.train.log_every) == (3, 7)


def test_single_quotes_are_literal_and_earlier_lines_interpolate():
    values = parse_env_text("RUN_NAME=r1\nOUTPUT_DIR=${RUN_NAME}/x\nDATASET='${RUN_NAME}'\n", "x.env", {})
    assert values == {"RUN_NAME": "r1", "OUTPUT_DIR": "r1/x", "DATASET": "${RUN_NAME}"}


# -- encodings and unreadable files --------------------------------------------------------------------------------


def test_non_utf8_profile_names_file_and_line(tmp_path):
    profile = write(tmp_path / "latin1.env", "SEED=1\nRUN_NAME=caf\xe9\n".encode("latin-1"))
    with pytest.raises(FplusError) as err:
        load_settings(str(profile), environ={}, dotenv=None)
    assert one_line(err) == (f"{profile}:2: not UTF-8 text (byte 0xe9 at column 13); save the file as UTF-8")


def test_non_utf8_dotenv_is_an_fplus_error(tmp_path):
    dotenv = write(tmp_path / ".env", b"\x93SEED=1\x94\n")
    with pytest.raises(FplusError, match=re.escape(f"{dotenv}:1: not UTF-8 text (byte 0x93 at column 1)")):
        load_settings(environ={}, dotenv=dotenv)


def test_utf16_or_binary_profile_says_save_as_utf8(tmp_path):
    utf16 = write(tmp_path / "u16.env", "SEED=1\n".encode("utf-16"))
    with pytest.raises(FplusError, match=r"u16\.env:1: NUL bytes: the file is UTF-16 or binary.*save it as UTF-8"):
        read_env_file(utf16)
    binary = write(tmp_path / "bin.env", b"SEED=1\nLOG\x00EVERY=2\n")
    with pytest.raises(FplusError, match=r"bin\.env:2: NUL bytes"):
        read_env_file(binary)


def test_utf8_bom_and_crlf_are_fine(tmp_path):
    profile = write(tmp_path / "bom.env", b"\xef\xbb\xbfSEED=5\r\nLOG_EVERY=2\r\n")
    assert read_env_file(profile) == {"SEED": "5", "LOG_EVERY": "2"}


def test_huge_settings_file_is_refused_without_reading_it(tmp_path):
    big = tmp_path / "big.env"
    with big.open("wb") as f:
        f.truncate(settings_module.MAX_ENV_FILE_BYTES + 1)
    with pytest.raises(FplusError, match=r"big\.env is 1048577 bytes, too big for a settings file.*right file"):
        read_env_file(big)


def test_unreadable_profile_is_an_fplus_error(tmp_path, monkeypatch):
    profile = write(tmp_path / "p.env", "SEED=1\n")

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(FplusError, match=rf"cannot read settings file {re.escape(str(profile))}: Permission denied"):
        read_env_file(profile)


def test_missing_profile_path_says_not_found(tmp_path):
    with pytest.raises(FplusError, match=r"profile file .*nope\.env not found: pass the path of an existing \.env "
                                         r"file or a profile name \(demo, h100, l40s\)"):
        load_settings(str(tmp_path / "nope.env"), environ={})


# -- misspelt environment variables --------------------------------------------------------------------------------


def warnings_of(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if "warning: environment variable" in line]


def test_misspelt_environment_variables_warn_with_a_suggestion(capsys):
    s = load_settings(environ={"BATCH_SIZ": "2", "WORLD_SOURC": "vjepa", "IMAGE_KYE": "cam"})
    assert s.train.batch_size == 8 and s.world.source == "dino"  # still ignored, but not silently
    lines = warnings_of(capsys)
    assert lines == [
        f"fplus: warning: environment variable {bad} is not a setting and is ignored (did you mean {good}?); "
        f"{NO_ENV_CHECK_ENV}=1 turns this check off"
        for bad, good in (("BATCH_SIZ", "BATCH_SIZE"), ("WORLD_SOURC", "WORLD_SOURCE"), ("IMAGE_KYE", "IMAGE_KEY"))]


def test_the_process_environment_is_checked(monkeypatch, capsys):
    monkeypatch.setenv("MAX_EPOCH", "3")
    load_settings()
    assert ["did you mean MAX_EPOCHS?" in line for line in warnings_of(capsys)] == [True]


def test_warned_once_per_process_not_per_load(capsys):
    for _ in range(4):  # the matrix loads settings several times
        load_settings(environ={"BATCH_SIZ": "2"})
        load_settings_with_origins("demo", environ={"BATCH_SIZ": "2"})
    assert len(warnings_of(capsys)) == 1


def test_settings_and_control_variables_never_warn(capsys):
    environ = {"BATCH_SIZE": "2", "SEED": "1", "COC": "false", "FPLUS_PROFILE": "", "FPLUS_DEBUG": "1",
               "FPLUS_PROFIL": "x", "FPLUS_NO_ENV_CHEK": "1", "PROFILE": "demo", "PROFILES": "x"}
    load_settings(environ=environ)
    assert warnings_of(capsys) == []


def test_lower_case_and_distant_names_never_warn(capsys):
    load_settings(environ={"batch_siz": "2", "Batch_Siz": "2", "SOMETHING_ELSE": "1", "CC": "gcc", "CXX": "g++",
                           "SEEDLINGS": "x", "ABC": "1"})
    assert warnings_of(capsys) == []


# Variables found in real shells, containers, CUDA/HF/MuJoCo setups, torchrun/accelerate/DeepSpeed/SLURM jobs and
# CI runners. LOCAL_RANK is within edit distance 2 of LORA_RANK, WORLD_SIZE of nothing, CC/CXX of COC.
REALISTIC_ENVIRONMENT = """
PATH HOME USER LOGNAME SHELL PWD OLDPWD LANG LANGUAGE LC_ALL LC_CTYPE TERM TERM_PROGRAM COLORTERM TZ EDITOR VISUAL
PAGER LESS MAIL HOSTNAME HOST DISPLAY TMPDIR TEMP TMP SHLVL COLUMNS LINES PS1 SSH_AUTH_SOCK SSH_CLIENT SSH_TTY
XDG_RUNTIME_DIR XDG_SESSION_ID XDG_DATA_DIRS XDG_CACHE_HOME DBUS_SESSION_BUS_ADDRESS LS_COLORS HISTSIZE HISTFILE
CUDA_VISIBLE_DEVICES CUDA_HOME CUDA_PATH CUDA_LAUNCH_BLOCKING CUDA_DEVICE_ORDER CUDA_MODULE_LOADING
NVIDIA_VISIBLE_DEVICES NVIDIA_DRIVER_CAPABILITIES NV_LIBCUBLAS_VERSION NCCL_DEBUG NCCL_P2P_DISABLE NCCL_IB_DISABLE
HF_HOME HF_HUB_OFFLINE HF_DATASETS_OFFLINE HF_TOKEN HF_HUB_CACHE HF_ENDPOINT HUGGINGFACE_HUB_CACHE
TRANSFORMERS_CACHE TRANSFORMERS_OFFLINE TOKENIZERS_PARALLELISM MUJOCO_GL PYOPENGL_PLATFORM EGL_DEVICE_ID
MESA_GL_VERSION_OVERRIDE OMP_NUM_THREADS MKL_NUM_THREADS OPENBLAS_NUM_THREADS NUMEXPR_MAX_THREADS KMP_DUPLICATE_LIB_OK
PYTHONPATH PYTHONHASHSEED PYTHONUNBUFFERED PYTHONDONTWRITEBYTECODE PYTHONWARNINGS VIRTUAL_ENV CONDA_PREFIX
CONDA_DEFAULT_ENV CONDA_SHLVL PIP_CACHE_DIR PIP_NO_CACHE_DIR UV_CACHE_DIR PYTEST_CURRENT_TEST PYTEST_ADDOPTS
RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE GROUP_RANK ROLE_RANK ROLE_NAME ROLE_WORLD_SIZE MASTER_ADDR MASTER_PORT
TORCHELASTIC_RUN_ID TORCHELASTIC_RESTART_COUNT TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_HOME TORCH_CUDA_ARCH_LIST
TORCHINDUCTOR_CACHE_DIR PYTORCH_CUDA_ALLOC_CONF ACCELERATE_MIXED_PRECISION ACCELERATE_USE_FSDP ACCELERATE_CONFIG_FILE
NODE_RANK CROSS_RANK CROSS_SIZE LOCAL_SIZE SLURM_JOB_ID SLURM_PROCID SLURM_NTASKS SLURM_JOB_NAME SLURM_NODELIST
WANDB_API_KEY WANDB_MODE WANDB_PROJECT WANDB_DIR GIT_PAGER GITHUB_ACTIONS GITHUB_WORKSPACE RUNNER_OS CI
KUBERNETES_SERVICE_HOST KUBERNETES_PORT JUPYTER_PATH JPY_PARENT_PID VSCODE_PID LD_LIBRARY_PATH LD_PRELOAD CC CXX
CFLAGS LDFLAGS MAKEFLAGS MAX_JOBS JAVA_HOME GOPATH NODE_ENV MPLBACKEND MPLCONFIGDIR TF_CPP_MIN_LOG_LEVEL XLA_FLAGS
TRITON_CACHE_DIR HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy REQUESTS_CA_BUNDLE SSL_CERT_FILE
""".split()


def test_a_realistic_environment_never_warns(capsys):
    environ = {**{name: "x" for name in REALISTIC_ENVIRONMENT}, **os.environ}
    assert env_near_misses(environ, env_vars()) == {}
    load_settings(environ={k: v for k, v in environ.items() if k not in env_vars()})
    assert warnings_of(capsys) == []


def test_exempt_prefixes_never_hide_a_setting():
    """A one-letter slip of every setting is reported, even of those sharing a tool's prefix (WANDB_, SLURM_)."""
    from fplus.envfile import env_near_misses

    known = env_vars()
    assert not [n for n in known if n in settings_module._ENV_CHECK_EXEMPT]
    slips = {n[:-1] + ("X" if n[-1] != "X" else "Y"): n for n in known if len(n) >= 4}  # shorter: never checked
    assert env_near_misses(dict.fromkeys(slips, "1"), known) == slips
    # the tools' own variables next to fplus's settings of the same prefix are not near misses
    tools = ["WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_NAME", "SLURM_JOB_ID", "SLURM_PROCID",
             "SLURM_CPUS_PER_TASK", "SLURM_GPUS_PER_NODE", "SLURM_JOB_ACCOUNT", "SLURM_NTASKS"]
    assert env_near_misses(dict.fromkeys(tools, "1"), known) == {}


def test_opt_out_silences_the_check(monkeypatch, capsys):
    load_settings(environ={"BATCH_SIZ": "2", NO_ENV_CHECK_ENV: "1"})
    monkeypatch.setenv(NO_ENV_CHECK_ENV, "true")
    load_settings(environ={"WORLD_SOURC": "vjepa"})
    assert warnings_of(capsys) == []
    monkeypatch.setenv(NO_ENV_CHECK_ENV, "0")
    load_settings(environ={"WORLD_SOURC": "vjepa"})
    assert len(warnings_of(capsys)) == 1


def test_only_rank_zero_warns(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "3")
    load_settings(environ={"BATCH_SIZ": "2"})
    assert warnings_of(capsys) == []


def test_opt_out_is_documented():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "settings.md").read_text()
    assert NO_ENV_CHECK_ENV in doc and "did you mean" in doc


def test_edit_distance():
    assert edit_distance("BATCH_SIZ", "BATCH_SIZE", 2) == 1
    assert edit_distance("IMAGE_KYE", "IMAGE_KEY", 2) == 1  # a swap is one edit
    assert edit_distance("LOCAL_RANK", "LORA_RANK", 2) == 2
    assert edit_distance("PATH", "BATCH_SIZE", 2) == 3  # capped at limit + 1
    assert edit_distance("", "", 2) == 0
