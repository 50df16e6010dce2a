#!/usr/bin/env bash
# Build (or check) a separate venv with two third-party LeRobot dataset tools from PyPI, for checking fplus's
# datasets with code that is neither fplus nor the lerobot library (tests/data/test_outside_checkers.py,
# FPLUS_OUTSIDE_VENV):
#     bash scripts/outside_checkers_env.sh [VENV]          # VENV defaults to .outside-venv in the repository
#     $VENV/bin/python scripts/check_outside_readers.py DATASET --out OUT.npz
#
# The two tools and what they need (read from their wheels' metadata and imports):
# - lerobot-doctor 0.2.0: dataset diagnostics (11 checks, PASS/WARN/FAIL). Pure Python over pyarrow, numpy, av,
#   rich and huggingface-hub (for hub ids only); no torch.
# - lerobot-dataset 0.4.4 (import name `ledataset`): a standalone copy of lerobot 0.4.4's LeRobotDataset. Its
#   metadata leaves torch and torchvision out on purpose ("manage your own PyTorch") but its code imports both at
#   module level, and it declares datasets<4.2, huggingface-hub<0.36, av<16, opencv-python-headless<4.13 (so
#   numpy<2.3), imageio[ffmpeg], cmake, deepdiff, jsonlines, termcolor, setuptools<81, packaging<26. All of them
#   are installed (pinned below) so that pip's dependency check passes; only torch comes from us:
#   * torch: the CPU wheel 2.13.0 (this machine's pip finds it through find-links); the constraints keep every
#     later install from replacing it with a CUDA build from PyPI.
#   * video: it decodes with torchcodec (its default when importable) or "pyav", which needs
#     torchvision.io.VideoReader (gone from torchvision). torchcodec 0.13.0 loads with the CPU torch 2.13 and needs
#     the system FFmpeg shared libraries (installed with apt when missing), as in scripts/lerobot_compat_env.sh.
#   * torchvision: PyPI's Linux wheels are CUDA builds that cannot be imported next to the CPU torch. ledataset's
#     reading path uses only transforms.ToTensor (for `image` features) and set_video_backend/io.VideoReader (the
#     pyav backend), so a small stand-in package is written (the same one as lerobot_compat_env.sh writes).
# Idempotent: a finished venv whose stamp (a hash of this file) matches is only smoke-tested. Needs root (or sudo)
# for apt if the FFmpeg libraries are missing.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${1:-$(dirname "$HERE")/.outside-venv}"
PYTHON="${PYTHON:-python3.11}"
start=$(date +%s)

# Every package of the venv, pinned (the full closure of TOP_LEVEL, as resolved on 2026-12 with Python 3.11).
# Used as pip constraints, so a resolve can neither drift nor pull a CUDA torch. (huggingface-hub's `hf-transfer`
# extra, asked for by lerobot-dataset, is not installed by pip 23 because of the extra's spelling; nothing needs it
# offline.)
CONSTRAINTS="
torch==2.13.0
lerobot-doctor==0.2.0
lerobot-dataset==0.4.4
torchcodec==0.13.0
aiohappyeyeballs==2.7.1
aiohttp==3.14.5
aiosignal==1.4.0
attrs==26.1.0
av==15.1.0
certifi==2026.10.19.post1
charset-normalizer==3.5.3
cmake==4.1.3
datasets==4.1.1
deepdiff==8.6.2
dill==0.4.0
filelock==4.3.1
frozenlist==1.8.0
fsspec==2025.9.0
hf-xet==1.8.0
huggingface-hub==0.35.3
idna==3.20
imageio==2.38.2
imageio-ffmpeg==0.8.1
inquirerpy==0.3.4
jinja2==3.1.6
jsonlines==4.0.0
markdown-it-py==4.3.0
markupsafe==3.0.4
mdurl==0.1.2
mpmath==1.3.0
multidict==7.2.1
multiprocess==0.70.16
networkx==3.6.1
numpy==2.2.6
opencv-python-headless==4.12.0.88
orderly-set==5.5.0
packaging==25.0
pandas==3.1.1
pfzy==0.3.4
pillow==13.0.0
prompt-toolkit==3.0.53
propcache==0.5.4
psutil==7.2.2
pyarrow==26.0.1
pygments==2.21.0
python-dateutil==4.0.0
pyyaml==6.0.4
requests==2.34.2
rich==15.0.0
setuptools==80.10.2
sympy==1.14.0
termcolor==3.3.0
tqdm==4.70.1
typing-extensions==4.16.0
tzdata==2026.6
urllib3==2.8.0
wcwidth==0.9.4
xxhash==4.1.0
yarl==1.25.1
"
TOP_LEVEL="lerobot-doctor lerobot-dataset torchcodec"
STAMP="$VENV/.fplus-outside-checkers"
want_stamp="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"

smoke_test() {
    HF_HUB_OFFLINE=1 "$VENV/bin/python" - "$HERE/../tests/fixtures/lerobot_v30_av1_multicam" <<'EOF'
import sys
from importlib.metadata import version
from pathlib import Path

import torch
from ledataset.datasets.lerobot_dataset import LeRobotDataset
from lerobot_doctor.dataset_loader import load_dataset
from lerobot_doctor.runner import run_checks

assert torch.version.cuda is None, f"expected the CPU torch, got CUDA {torch.version.cuda}"
print(f"lerobot-doctor {version('lerobot-doctor')}, lerobot-dataset {version('lerobot-dataset')}, "
      f"torch {torch.__version__}, torchcodec {version('torchcodec')}")
root = Path(sys.argv[1])
if (root / "meta" / "info.json").is_file():
    ds = LeRobotDataset("local/x", root=root)
    item = ds[len(ds) - 1]
    counts = run_checks(load_dataset(str(root)), checks=["metadata"]).summary_counts
    print(f"smoke test: {root.name}: {ds.num_frames} frames, last frame {sorted(k for k in item if 'images' in k)}; "
          f"lerobot-doctor metadata check {counts}")
EOF
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" ]] && smoke_test >/dev/null 2>&1; then
    echo "outside checkers venv $VENV is up to date"
    exit 0
fi
echo "building the outside checkers venv $VENV"

# 1. FFmpeg shared libraries for torchcodec (system packages; PyAV's wheel bundles its own, torchcodec does not).
if ! ldconfig -p | grep -q 'libavdevice\.so\.' || ! ldconfig -p | grep -q 'libavfilter\.so\.'; then
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null
fi

# 2. The venv: the CPU torch first, then the two tools with all their declared dependencies, all pinned.
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
constraints_file="$(mktemp)"
trap 'rm -f "$constraints_file"' EXIT
printf '%s\n' "$CONSTRAINTS" | grep -v '^$' > "$constraints_file"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install -c "$constraints_file" torch==2.13.0
# shellcheck disable=SC2086  # TOP_LEVEL is a list of package names
"${PIP[@]}" install -c "$constraints_file" $TOP_LEVEL
"${PIP[@]}" check

# 3. The torchvision stand-in (a CUDA torchvision from PyPI cannot be imported here; remove one if present).
"${PIP[@]}" uninstall -y torchvision 2>/dev/null || true
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p "$site/torchvision"
cat > "$site/torchvision/__init__.py" <<'EOF'
"""Stand-in for torchvision in the outside-checkers venv (written by fplus scripts/outside_checkers_env.sh).

PyPI's Linux torchvision wheels are CUDA builds: `import torchvision` fails next to the CPU torch wheel
("operator torchvision::nms does not exist"), and no CPU torchvision is on PyPI. lerobot-dataset 0.4.4 (ledataset)
needs only `transforms.ToTensor` (for `image` features) and, for its "pyav" video backend, `io.VideoReader`, which
torchvision itself no longer ships. Videos are decoded with torchcodec (ledataset's default backend) here.
"""

from . import io, transforms

__version__ = "0.0.0+outside-checkers-stub"
_video_backend = "pyav"


def set_video_backend(backend):
    raise RuntimeError(
        f"video backend {backend!r} needs torchvision.io.VideoReader, which this venv does not have "
        "(outside-checkers stub); use video_backend='torchcodec'"
    )


def get_video_backend():
    return _video_backend
EOF
cat > "$site/torchvision/io.py" <<'EOF'
"""No video or image IO in the outside-checkers torchvision stand-in; see torchvision/__init__.py."""


class VideoReader:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision.io.VideoReader is not available (outside-checkers stub); use torchcodec")
EOF
cat > "$site/torchvision/transforms.py" <<'EOF'
"""`ToTensor` with torchvision's semantics for what ledataset passes it: PIL images and HWC arrays."""

import numpy as np
import torch


class ToTensor:
    """PIL image or (H, W[, C]) ndarray -> (C, H, W) tensor; uint8 data becomes float32 scaled to [0, 1]."""

    def __call__(self, pic):
        if isinstance(pic, np.ndarray):
            arr = pic if pic.ndim == 3 else pic[:, :, None]
        else:
            if pic.mode == "1":
                arr = 255 * np.array(pic, dtype=np.uint8, copy=True)
            else:
                dtype = {"I": np.int32, "I;16": np.int16, "F": np.float32}.get(pic.mode, np.uint8)
                arr = np.array(pic, dtype=dtype, copy=True)
            arr = arr.reshape(pic.size[1], pic.size[0], -1)
        img = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        if img.dtype == torch.uint8:
            return img.to(torch.float32).div(255)
        return img

    def __repr__(self):
        return f"{self.__class__.__name__}()"
EOF

# 4. Check and stamp.
smoke_test
echo "$want_stamp" > "$STAMP"
echo "outside checkers venv ready: $VENV ($(du -sh "$VENV" | cut -f1), $(( $(date +%s) - start )) s)"
