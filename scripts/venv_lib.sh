# Shared steps of the scripts that build a venv of their own next to fplus's CPU torch (sourced, not run):
# scripts/lerobot_compat_env.sh, scripts/lerobot_v21_env.sh and scripts/outside_checkers_env.sh. Each script keeps
# its own pins, package lists, smoke test and reasons; this file only holds what they do the same way:
#     venv_stamp < TEXT                    16 hex digits: sha256 of TEXT, this file and scripts/torchvision_stub/
#     venv_is_current STAMP WANT SMOKE     STAMP holds WANT and the function SMOKE passes (quietly)
#     ensure_ffmpeg_libs                   the system FFmpeg shared libraries for torchcodec (apt when missing)
#     make_venv_with_constraints VENV PYTHON CONSTRAINTS
#                                          the venv, PIP (an array: its pip) and VENV_CONSTRAINTS_FILE (CONSTRAINTS
#                                          as a pip constraints file), then the torch pin of CONSTRAINTS (the CPU
#                                          wheel 2.13.0, found through this machine's find-links), installed first
#     install_torchvision_stub VENV LABEL  scripts/torchvision_stub/ as the venv's torchvision (see its __init__.py)
#     finish_venv WHAT VENV STAMP WANT START
#                                          writes the stamp and says "WHAT ready: VENV (size, seconds since START)"
# The stamp covers this file and the stand-in, so changing either rebuilds every venv built with them.

VENV_LIB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

venv_stamp() {
    cat - "$VENV_LIB_DIR/venv_lib.sh" "$VENV_LIB_DIR"/torchvision_stub/*.py | sha256sum | cut -c1-16
}

venv_is_current() {
    local stamp="$1" want="$2" smoke="$3"
    [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$smoke" >/dev/null 2>&1
}

# torchcodec needs libavdevice and libavfilter from the system (PyAV's wheel bundles its own, torchcodec does not).
# Needs root (or sudo) when they are missing.
ensure_ffmpeg_libs() {
    local libs sudo=""
    libs="$(ldconfig -p)"
    if ! grep -q 'libavdevice\.so\.' <<<"$libs" || ! grep -q 'libavfilter\.so\.' <<<"$libs"; then
        [[ $(id -u) -ne 0 ]] && sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null
    fi
}

# Sets the globals PIP and VENV_CONSTRAINTS_FILE (removed when the calling script exits). Constraints keep every later
# install from replacing the CPU torch with a CUDA build from PyPI.
make_venv_with_constraints() {
    local venv="$1" python="$2" constraints="$3" torch_pin
    torch_pin="$(printf '%s\n' "$constraints" | grep '^torch==')" || {
        echo "venv_lib.sh: the constraints have no torch==VERSION line" >&2
        return 1
    }
    [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
    VENV_CONSTRAINTS_FILE="$(mktemp)"
    trap 'rm -f "$VENV_CONSTRAINTS_FILE"' EXIT
    printf '%s\n' "$constraints" | grep -v '^$' > "$VENV_CONSTRAINTS_FILE"
    PIP=("$venv/bin/python" -m pip --disable-pip-version-check -q)
    "${PIP[@]}" install -c "$VENV_CONSTRAINTS_FILE" "$torch_pin"
}

# A CUDA torchvision from PyPI cannot be imported next to the CPU torch: remove one if present, then copy the stand-in
# into the venv's site-packages with LABEL (letters, digits, dashes) in its docstrings, messages and __version__.
install_torchvision_stub() {
    local venv="$1" label="$2" site src
    [[ "$label" =~ ^[a-z0-9-]+$ ]] || { echo "venv_lib.sh: bad stand-in label '$label'" >&2; return 1; }
    "$venv/bin/python" -m pip --disable-pip-version-check -q uninstall -y torchvision 2>/dev/null || true
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    mkdir -p "$site/torchvision"
    for src in "$VENV_LIB_DIR"/torchvision_stub/*.py; do
        sed "s/@VENV_LABEL@/$label/g" "$src" > "$site/torchvision/$(basename "$src")"
    done
}

finish_venv() {
    local what="$1" venv="$2" stamp="$3" want="$4" start="$5"
    echo "$want" > "$stamp"
    echo "$what ready: $venv ($(du -sh "$venv" | cut -f1), $(( $(date +%s) - start )) s)"
}
