#!/usr/bin/env bash
# Build (or check) a separate venv with the lerobot library, for checking fplus against the reference
# implementation of the LeRobot v3.0 format:
#     bash scripts/lerobot_compat_env.sh [VENV]          # VENV defaults to /opt/lerobot-venv
#     $VENV/bin/python scripts/check_lerobot_reads.py DATASET
#     $VENV/bin/python scripts/make_lerobot_fixture.py
#
# Why a separate venv and why it looks like this:
# - lerobot 0.4.4 pins torch<2.11 and torchvision<0.26; fplus uses torch 2.13 (CPU). lerobot's dataset code works
#   with torch 2.13, so lerobot is installed with --no-deps and only what its dataset code imports is added
#   (its robots, policies, training and visualisation dependencies are left out).
# - torch is the CPU wheel 2.13.0 (this machine's pip finds it through find-links). Constraints keep every later
#   install from replacing it with a CUDA build from PyPI.
# - Video decoding: lerobot 0.4.4 decodes with torchcodec (its default) or "pyav", which needs
#   torchvision.io.VideoReader, gone from torchvision since 0.2x. torchcodec 0.11.1-0.13.0 load with the CPU torch
#   2.13 (0.10 misses a c10 symbol, 0.14+ need CUDA's libnvrtc) and need the system FFmpeg shared libraries
#   (any of FFmpeg 4-8), installed here with apt.
# - torchvision: PyPI's Linux wheels are CUDA builds (their _C.so needs libtorch_cuda.so), so `import torchvision`
#   fails next to the CPU torch ("operator torchvision::nms does not exist"), and PyPI has no CPU wheel or sdist.
#   lerobot/datasets/utils.py and video_utils.py import it at module level but only use transforms.ToTensor
#   (for `image` features) and the pyav backend. A small stand-in package is copied in instead
#   (scripts/torchvision_stub/).
# The steps shared with the other venv scripts are in scripts/venv_lib.sh. Idempotent: a finished venv whose pins
# (and shared steps) match is only smoke-tested. Needs root (or sudo) for apt if the FFmpeg libraries are missing.
set -euo pipefail

VENV="${1:-/opt/lerobot-venv}"
PYTHON="${PYTHON:-python3.11}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
start=$(date +%s)
# shellcheck source=scripts/venv_lib.sh
source "$HERE/venv_lib.sh"

# Every package of the venv, pinned (the full closure of the top-level list below, as resolved on 2026-11 with
# Python 3.11). Used as pip constraints, so a resolve can neither drift nor pull a CUDA torch.
CONSTRAINTS="
torch==2.13.0
lerobot==0.4.4
accelerate==1.15.0
aiohappyeyeballs==2.7.1
aiohttp==3.14.5
aiosignal==1.4.0
anyio==4.16.0
attrs==26.1.0
av==15.1.0
certifi==2026.10.18
charset-normalizer==3.5.2
datasets==4.8.5
dill==0.4.1
filelock==4.2.12
frozenlist==1.8.0
fsspec==2026.2.0
h11==0.16.0
hf-xet==1.8.0
httpcore==1.0.9
httpx==0.28.1
huggingface-hub==0.35.3
idna==3.20
jinja2==3.1.6
markupsafe==3.0.4
mpmath==1.3.0
multidict==7.2.1
multiprocess==0.70.19
networkx==3.6.1
numpy==2.4.6
packaging==25.0
pandas==2.3.3
pillow==13.0.0
propcache==0.5.4
psutil==7.2.2
pyarrow==26.0.1
python-dateutil==4.0.0
pytz==2026.6
pyyaml==6.0.3
requests==2.34.2
safetensors==0.8.0
setuptools==84.2.1
sympy==1.14.0
torchcodec==0.13.0
tqdm==4.70.1
typing-extensions==4.16.0
tzdata==2026.6
urllib3==2.8.0
xxhash==4.1.0
yarl==1.25.1
"
# What lerobot.datasets imports and needs to load and write datasets (video included), within lerobot's ranges
# where it has one (datasets<5, huggingface-hub<0.36, av<16, packaging<26).
TOP_LEVEL="datasets huggingface-hub accelerate av pandas numpy pyarrow pillow packaging torchcodec"
STAMP="$VENV/.fplus-lerobot-compat"
want_stamp="$(printf '%s\n%s\n' "$CONSTRAINTS" "$TOP_LEVEL" | venv_stamp)"

smoke_test() {
    HF_HUB_OFFLINE=1 "$VENV/bin/python" - "$HERE/../tests/fixtures/lerobot_v30_av1_multicam" <<'EOF'
import sys
from pathlib import Path
import torch, torchcodec, lerobot
from lerobot.datasets.lerobot_dataset import LeRobotDataset
assert torch.version.cuda is None, f"expected the CPU torch, got CUDA {torch.version.cuda}"
print(f"lerobot {lerobot.__version__}, torch {torch.__version__}, torchcodec {torchcodec.__version__}")
root = Path(sys.argv[1])
if (root / "meta" / "info.json").is_file():
    ds = LeRobotDataset("local/x", root=root)
    item = ds[len(ds) - 1]
    print(f"smoke test: read {root.name}: {ds.num_episodes} episodes, {ds.num_frames} frames, "
          f"last frame {[k for k in item if k.startswith('observation.images')]}")
EOF
}

if venv_is_current "$STAMP" "$want_stamp" smoke_test; then
    echo "lerobot compat venv $VENV is up to date"
    exit 0
fi
echo "building the lerobot compat venv $VENV"

# 1. FFmpeg shared libraries for torchcodec (system packages; PyAV's wheel bundles its own, torchcodec does not).
ensure_ffmpeg_libs

# 2. The venv, the CPU torch, lerobot without its dependencies.
make_venv_with_constraints "$VENV" "$PYTHON" "$CONSTRAINTS"
"${PIP[@]}" install --no-deps lerobot==0.4.4
echo "(pip's notes that lerobot 0.4.4 requires torch<2.11, torchvision, wandb, ... are expected: see the top of this file)"
# shellcheck disable=SC2086  # TOP_LEVEL is a list of package names
"${PIP[@]}" install -c "$VENV_CONSTRAINTS_FILE" $TOP_LEVEL

# 3. The torchvision stand-in (a CUDA torchvision from PyPI cannot be imported here; one is removed if present).
install_torchvision_stub "$VENV" lerobot-compat

# 4. Check and stamp.
smoke_test
finish_venv "lerobot compat venv" "$VENV" "$STAMP" "$want_stamp" "$start"
