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
#     pyav backend), so a small stand-in package is copied in (scripts/torchvision_stub/, as for the lerobot venvs).
# The steps shared with the other venv scripts are in scripts/venv_lib.sh. Idempotent: a finished venv whose stamp (a
# hash of this file, scripts/venv_lib.sh and scripts/torchvision_stub/) matches is only smoke-tested. Needs root (or
# sudo) for apt if the FFmpeg libraries are missing.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${1:-$(dirname "$HERE")/.outside-venv}"
PYTHON="${PYTHON:-python3.11}"
start=$(date +%s)
# shellcheck source=scripts/venv_lib.sh
source "$HERE/venv_lib.sh"

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
want_stamp="$(venv_stamp < "${BASH_SOURCE[0]}")"

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

if venv_is_current "$STAMP" "$want_stamp" smoke_test; then
    echo "outside checkers venv $VENV is up to date"
    exit 0
fi
echo "building the outside checkers venv $VENV"

# 1. FFmpeg shared libraries for torchcodec (system packages; PyAV's wheel bundles its own, torchcodec does not).
ensure_ffmpeg_libs

# 2. The venv: the CPU torch first, then the two tools with all their declared dependencies, all pinned.
make_venv_with_constraints "$VENV" "$PYTHON" "$CONSTRAINTS"
# shellcheck disable=SC2086  # TOP_LEVEL is a list of package names
"${PIP[@]}" install -c "$VENV_CONSTRAINTS_FILE" $TOP_LEVEL
"${PIP[@]}" check

# 3. The torchvision stand-in (a CUDA torchvision from PyPI cannot be imported here; one is removed if present).
install_torchvision_stub "$VENV" outside-checkers

# 4. Check and stamp.
smoke_test
finish_venv "outside checkers venv" "$VENV" "$STAMP" "$want_stamp" "$start"
