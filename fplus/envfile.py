"""`.env`-style settings files and the environment: a strict KEY=VALUE parser, and the misspelt-variable check.

Profiles and `.env` are parsed strictly (`parse_env_text`): a line that is not KEY=VALUE, a comment or blank, and
bytes that are not UTF-8, are errors naming the file and line. An environment variable that looks like a misspelt
setting (BATCH_SIZ) is ignored with a warning (`warn_env_near_misses`; FPLUS_NO_ENV_CHECK=1 turns it off).
`fplus.settings` layers what these return.
"""

from __future__ import annotations

import os
import re
import sys
from collections import ChainMap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fplus.errors import ConfigError

MAX_ENV_FILE_BYTES = 1 << 20  # a settings file is a few KB; anything this big is the wrong file

_NEWLINE = re.compile(r"\r\n|\n|\r")
_BLANK_OR_COMMENT = re.compile(r"[^\S\r\n]*(?:#[^\r\n]*)?(?:\r\n|\n|\r|$)")
_KEY = re.compile(r"[^\S\r\n]*(?:export[^\S\r\n]+)?(?P<key>[^=\s#]+)(?P<space>[^\S\r\n]*)")
_VALID_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EQUALS = re.compile(r"=(?P<space>[^\S\r\n]*)")
_SINGLE_QUOTED = re.compile(r"'((?:\\.|[^'\\])*)'", re.DOTALL)
_DOUBLE_QUOTED = re.compile(r'"((?:\\.|[^"\\])*)"', re.DOTALL)
_UNQUOTED = re.compile(r"[^\r\n]*")
_AFTER_VALUE = re.compile(r"[^\S\r\n]*(?:#[^\r\n]*)?(?:\r\n|\n|\r|$)")
_DOUBLE_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
                   "t": "\t", "v": "\v"}
_VARIABLE = re.compile(r"\$\{(?P<name>[^}:]*)(?::-(?P<default>[^}]*))?\}")


def _decode_env_bytes(path: Path, data: bytes) -> str:
    """The text of a settings file; anything but UTF-8 (UTF-16, binary, Latin-1) is an error naming the line."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data:
        line = data[:data.find(b"\x00")].count(b"\n") + 1 if b"\x00" in data else 1
        raise ConfigError(f"{path}:{line}: NUL bytes: the file is UTF-16 or binary, not a settings file; "
                         "save it as UTF-8 text with KEY=VALUE lines")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}); "
                         "save the file as UTF-8") from None


def _physical_line(text: str, pos: int) -> str:
    start = max(text.rfind("\n", 0, pos), text.rfind("\r", 0, pos)) + 1
    end = _NEWLINE.search(text, start)
    line = text[start:end.start() if end else len(text)]
    return line if len(line) <= 80 else line[:77] + "..."


def _interpolate(value: str, env: Mapping[str, str]) -> str:
    """`${NAME}` and `${NAME:-default}` as python-dotenv expands them (earlier lines of the file, then env)."""

    def expand(match: re.Match[str]) -> str:
        found = env.get(match["name"], match["default"] or "")
        return "" if found is None else found

    return _VARIABLE.sub(expand, value) if "${" in value else value


def parse_env_text(text: str, path: Path | str, environ: Mapping[str, str] | None = None, *,
                   lines: dict[str, int] | None = None) -> dict[str, str]:
    """KEY=VALUE pairs of `.env` text, parsed strictly: any line that is not a binding, a comment or blank is an
    FplusError naming `path`, the line number and the line.

    Accepted (python-dotenv's syntax): `KEY=value` (an unquoted value ends before ` #`, surrounding blanks are
    stripped), `export KEY=value`, `KEY='single quoted'` (literal as in a shell, `\\'` escapes a quote),
    `KEY="double quoted"` (escapes \\n \\t \\" ..., may span lines), `${NAME}` / `${NAME:-default}` in unquoted
    and double-quoted values (from earlier lines of the file, then `environ`), `# comments` and blank lines.
    Refused: a line without `=` (`BATCH_SIZE 4`), a key that is not letters, digits and `_`, an unterminated
    quote, text after a closing quote. `lines`, when given, receives the line number of each key.
    """
    environ = os.environ if environ is None else environ
    text = text.removeprefix("\ufeff")
    values: dict[str, str] = {}
    pos, line = 0, 1

    def fail(at: int, why: str) -> ConfigError:
        return ConfigError(f"{path}:{line}: cannot parse {_physical_line(text, at)!r}: {why}; "
                          "write KEY=VALUE (comments start with #)")

    while pos < len(text):
        start = pos
        blank = _BLANK_OR_COMMENT.match(text, pos)
        if blank and blank.end() > pos:
            pos = blank.end()
            line += len(_NEWLINE.findall(text, start, pos))
            continue
        key_match = _KEY.match(text, pos)
        if key_match is None:
            raise fail(start, "a line must start with a name")
        key = key_match["key"]
        if not _VALID_KEY.fullmatch(key):
            raise fail(start, f"{key[:40]!r} is not a valid name (letters, digits and _, not starting with a digit)")
        pos = key_match.end()
        equals = _EQUALS.match(text, pos)
        if equals is None:
            raise fail(start, f"no '=' after {key}")
        pos = equals.end()
        char = text[pos:pos + 1]
        if char in ("'", '"'):
            quoted = (_SINGLE_QUOTED if char == "'" else _DOUBLE_QUOTED).match(text, pos)
            if quoted is None:
                raise fail(start, f"the {'single' if char == chr(39) else 'double'}-quoted value of {key} "
                                  "is never closed")
            raw = quoted.group(1)
            if char == "'":
                value = re.sub(r"\\([\\'])", r"\1", raw)
            else:
                value = re.sub(r"\\(.)", lambda m: _DOUBLE_ESCAPES.get(m[1], m[0]), raw, flags=re.DOTALL)
                value = _interpolate(value, ChainMap(values, environ))
            pos = quoted.end()
            after = _AFTER_VALUE.match(text, pos)
            if after is None:
                raise fail(start, f"text after the closing quote of {key}")
            pos = after.end()
        elif equals["space"] and char == "#":  # `KEY= # comment`: an empty value
            pos = _UNQUOTED.match(text, pos).end()
            value = ""
        else:
            unquoted = _UNQUOTED.match(text, pos)
            value = _interpolate(re.sub(r"\s+#.*", "", unquoted.group(0)).strip(), ChainMap(values, environ))
            pos = unquoted.end()
        end_of_line = _NEWLINE.match(text, pos)
        if end_of_line:
            pos = end_of_line.end()
        if lines is not None:
            lines[key] = line
        line += len(_NEWLINE.findall(text, start, pos))
        values[key] = value
    return values


def read_env_file(path: Path, environ: Mapping[str, str] | None = None, *,
                  lines: dict[str, int] | None = None) -> dict[str, str]:
    """KEY=VALUE pairs of a `.env`-style file (see `parse_env_text`); an unreadable, non-UTF-8 or unparsable file
    is an FplusError naming the file and line."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_ENV_FILE_BYTES:
            raise ConfigError(f"{path} is {size} bytes, too big for a settings file (at most {MAX_ENV_FILE_BYTES}); "
                             "is it the right file?")
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read settings file {path}: {err.strerror or err}") from None
    return parse_env_text(_decode_env_bytes(path, data), path, environ, lines=lines)


NO_ENV_CHECK_ENV = "FPLUS_NO_ENV_CHECK"
_ENV_STYLE = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*")
# Variables of shells, Python, CUDA, the HF hub, MuJoCo, launchers, schedulers and CI: never near-misses, even when
# they happen to be close to a setting name. A prefix that some setting shares (WANDB_PROJECT, SLURM_PARTITION) does
# not exempt: those variables are checked like any other, so a misspelt setting is never hidden (a test checks it).
_ENV_CHECK_EXEMPT_PREFIXES = (
    "FPLUS_", "PROFILE", "LC_", "XDG_", "SSH_", "GPG_", "DBUS_", "TERM", "TMUX", "SUDO_", "LS_", "LESS", "HIST",
    "PYTHON", "PIP_", "UV_", "CONDA", "MAMBA", "VIRTUAL_ENV", "PYENV", "POETRY_", "PYTEST_", "COV_", "COVERAGE_",
    "CUDA", "CUDNN", "CUBLAS", "NCCL_", "NVIDIA_", "NV_", "TORCH", "TRITON_", "PYTORCH_", "HIP_", "HSA_", "ROCM",
    "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "ACCELERATE_", "DS_", "DEEPSPEED_", "SAFETENSORS_",
    "MUJOCO_", "PYOPENGL_", "EGL_", "MESA_", "LIBGL_", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "GOTO", "NUMEXPR_",
    "SLURM_", "PBS_", "LSB_", "SGE_", "MASTER_", "GROUP_", "ROLE_", "LOCAL_", "WORLD_SIZE", "TORCHELASTIC_",
    "WANDB_", "TRACKIO_", "TENSORBOARD_", "MLFLOW_", "GIT_", "GITHUB_", "GITLAB_", "RUNNER_", "CI_", "BUILDKITE_",
    "KUBERNETES_", "DOCKER_", "JUPYTER", "JPY_", "VSCODE_", "COLAB_", "KAGGLE_", "AWS_", "GOOGLE_", "GCP_", "AZURE_",
    "LD_", "DYLD_", "JAVA_", "NODE_", "NPM_", "GOTO", "RUST", "CARGO_", "MPL", "TF_", "XLA_", "JAX_", "TPU_",
)
_ENV_CHECK_EXEMPT = frozenset("""
    PATH HOME USER USERNAME LOGNAME SHELL PWD OLDPWD LANG LANGUAGE TZ EDITOR VISUAL PAGER MAIL MAILCHECK HOSTNAME HOST
    HOSTTYPE OSTYPE MACHTYPE DISPLAY WAYLAND_DISPLAY TMPDIR TEMP TMP SHLVL COLUMNS LINES COLORTERM CLICOLOR
    NO_COLOR FORCE_COLOR MANPATH INFOPATH CPATH LIBRARY_PATH PKG_CONFIG_PATH CC CXX CPP FC LD AR NM CFLAGS CXXFLAGS
    CPPFLAGS LDFLAGS MAKEFLAGS MAX_JOBS RANK NODE_RANK WORLD_RANK CROSS_RANK CROSS_SIZE OMPI_COMM_WORLD_RANK
    HTTP_PROXY HTTPS_PROXY NO_PROXY ALL_PROXY FTP_PROXY REQUESTS_CA_BUNDLE SSL_CERT_FILE SSL_CERT_DIR CURL_CA_BUNDLE
    MPLBACKEND PS1 PS2 PS4 PROMPT_COMMAND IFS OPTIND HISTFILE CONTAINER SINGULARITY_NAME APPTAINER_NAME
    NPROC NUM_CPUS NUMBA_NUM_THREADS BASH BASH_ENV ENV ZDOTDIR ZSH EUID UID PPID RANDOM SECONDS GOPATH GOROOT
    GOFLAGS GOPROXY GOCACHE
""".split())


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


def edit_distance(a: str, b: str, limit: int) -> int:
    """Optimal-string-alignment distance (insertions, deletions, substitutions, adjacent swaps), capped: any
    distance above `limit` is returned as limit + 1."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    before: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], before[j - 2] + 1)
        if min(cur) > limit:
            return limit + 1
        before, prev = prev, cur
    return min(prev[-1], limit + 1)


def env_near_misses(environ: Mapping[str, str], known: Mapping[str, Any]) -> dict[str, str]:
    """{variable: setting} for environment names that look like a misspelt setting: upper case with underscores,
    not a setting, not an FPLUS_*/PROFILE control or a well-known shell/tool variable, at least 4 characters and
    within edit distance 2 of a setting name (1 for settings of at most 5 characters, e.g. SEED, COC). `known`: the
    settings by name (fplus.settings.env_vars())."""
    out: dict[str, str] = {}
    exempt = tuple(p for p in _ENV_CHECK_EXEMPT_PREFIXES if not any(k.startswith(p) for k in known))
    for name in environ:
        if (name in known or len(name) < 4 or not _ENV_STYLE.fullmatch(name) or name in _ENV_CHECK_EXEMPT
                or name.startswith(exempt)):
            continue
        best: tuple[int, str] | None = None
        for setting in known:
            limit = 1 if len(setting) <= 5 else 2
            d = edit_distance(name, setting, limit)
            if d <= limit and (best is None or d < best[0]):
                best = (d, setting)
        if best is not None:
            out[name] = best[1]
    return out


_ENV_WARNED: set[str] = set()  # near-misses already reported by this process (load_settings runs many times)


def warn_env_near_misses(environ: Mapping[str, str], known: Mapping[str, Any]) -> list[str]:
    """Print one stderr line per misspelt-looking environment variable (see `env_near_misses`), once per process
    and only on rank 0; FPLUS_NO_ENV_CHECK=1 turns the check off. Returns the lines printed."""
    if _truthy(environ.get(NO_ENV_CHECK_ENV)) or _truthy(os.environ.get(NO_ENV_CHECK_ENV)):
        return []
    if os.environ.get("RANK", "0") != "0":
        return []
    lines = []
    for name, setting in env_near_misses(environ, known).items():
        if name in _ENV_WARNED:
            continue
        _ENV_WARNED.add(name)
        lines.append(f"fplus: warning: environment variable {name} is not a setting and is ignored (did you mean "
                     f"{setting}?); {NO_ENV_CHECK_ENV}=1 turns this check off")
    for line in lines:
        print(line, file=sys.stderr)
    return lines
