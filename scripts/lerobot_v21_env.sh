#!/usr/bin/env bash
# Build (or check) a separate venv with lerobot 0.3.3, the last lerobot that writes LeRobot v2.1 datasets, for
# making the v2.1 fixture and the values lerobot reads from it (fplus converts v2.1 on open: fplus/data/v21.py):
#     bash scripts/lerobot_v21_env.sh [VENV]          # VENV defaults to /tmp/lerobot-v21-venv
#     $VENV/bin/python scripts/make_lerobot_v21_fixture.py
#
# Why it looks like this (the same reasons as scripts/lerobot_compat_env.sh, with lerobot 0.3.3's pins):
# - lerobot 0.3.3 pins torch<2.8, torchvision<0.23, torchcodec<0.6 and datasets<=3.6.0, and pulls robot, training
#   and visualisation packages. It is installed with --no-deps, and only what lerobot.datasets imports is added
#   (datasets 3.6.0, the newest it allows; jsonlines, for the v2.1 JSON-lines metadata).
# - torch is the CPU wheel 2.13.0 (this machine's pip finds it through find-links), held by constraints. lerobot
#   0.3.3's dataset code works with it.
# - Video: lerobot 0.3.3 encodes with PyAV (av 15.1.0, libsvtav1 by default) and decodes with torchcodec when it is
#   installed, else with torchvision.io.VideoReader ("pyav"), which no current torchvision has. torchcodec 0.13.0
#   (0.2-0.5, which lerobot asks for, do not load with torch 2.13) over the system FFmpeg libraries (apt `ffmpeg`)
#   serves lerobot's get_frames_at API unchanged.
# - pandas 2.3.3: datasets 3.6.0 predates pandas 3.
# - torchvision: PyPI's Linux wheels are CUDA builds that cannot be imported next to the CPU torch; lerobot 0.3.3's
#   datasets/utils.py and video_utils.py import it at module level and use only transforms.ToTensor (for `image`
#   features). A small stand-in package is copied in instead (scripts/torchvision_stub/).
# The steps shared with the other venv scripts are in scripts/venv_lib.sh. Idempotent: a finished venv whose pins
# (and shared steps) match is only smoke-tested. Needs root (or sudo) for apt if the FFmpeg libraries are missing.
set -euo pipefail

VENV="${1:-/tmp/lerobot-v21-venv}"
PYTHON="${PYTHON:-python3.11}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
start=$(date +%s)
# shellcheck source=scripts/venv_lib.sh
source "$HERE/venv_lib.sh"

# Every package of the venv, pinned (the closure of the top-level list below, resolved 2026-12 with Python 3.11).
CONSTRAINTS="
torch==2.13.0
lerobot==0.3.3
aiohappyeyeballs==2.7.1
aiohttp==3.14.5
aiosignal==1.4.0
attrs==26.1.0
av==15.1.0
certifi==2026.10.19.post1
charset-normalizer==3.5.3
datasets==3.6.0
dill==0.3.8
filelock==4.3.1
frozenlist==1.8.0
fsspec==2025.3.0
hf-xet==1.8.0
huggingface-hub==0.35.3
idna==3.20
jinja2==3.1.6
jsonlines==4.0.0
markupsafe==3.0.4
mpmath==1.3.0
multidict==7.2.1
multiprocess==0.70.16
networkx==3.6.1
numpy==2.4.6
packaging==26.4
pandas==2.3.3
pillow==13.0.0
propcache==0.5.4
pyarrow==26.0.1
python-dateutil==4.0.0
pytz==2026.6
pyyaml==6.0.4
requests==2.34.2
sympy==1.14.0
torchcodec==0.13.0
tqdm==4.70.1
typing-extensions==4.16.0
tzdata==2026.6
urllib3==2.8.0
xxhash==4.1.0
yarl==1.25.1
"
TOP_LEVEL="datasets huggingface-hub av jsonlines pandas numpy pyarrow pillow packaging torchcodec"
STAMP="$VENV/.fplus-lerobot-v21"
want_stamp="$(printf '%s\n%s\n' "$CONSTRAINTS" "$TOP_LEVEL" | venv_stamp)"

smoke_test() {
    HF_HUB_OFFLINE=1 "$VENV/bin/python" - "$HERE/../tests/fixtures/lerobot_v21_av1" <<'EOF'
import sys
from pathlib import Path
import torch, torchcodec, lerobot
from lerobot.datasets.lerobot_dataset import CODEBASE_VERSION, LeRobotDataset
assert torch.version.cuda is None, f"expected the CPU torch, got CUDA {torch.version.cuda}"
assert CODEBASE_VERSION == "v2.1", CODEBASE_VERSION
print(f"lerobot {lerobot.__version__} ({CODEBASE_VERSION}), torch {torch.__version__}, torchcodec {torchcodec.__version__}")
root = Path(sys.argv[1])
if (root / "meta" / "info.json").is_file():
    ds = LeRobotDataset("fplus/lerobot_v21_av1", root=root)
    item = ds[len(ds) - 1]
    print(f"smoke test: read {root.name}: {ds.num_episodes} episodes, {ds.num_frames} frames, "
          f"last frame {tuple(item['observation.images.image'].shape)}")
EOF
}

if venv_is_current "$STAMP" "$want_stamp" smoke_test; then
    echo "lerobot v2.1 venv $VENV is up to date"
    exit 0
fi
echo "building the lerobot v2.1 venv $VENV"

# 1. FFmpeg shared libraries for torchcodec (PyAV's wheel bundles its own, torchcodec does not).
ensure_ffmpeg_libs

# 2. The venv, the CPU torch, lerobot without its dependencies, what lerobot.datasets needs.
make_venv_with_constraints "$VENV" "$PYTHON" "$CONSTRAINTS"
"${PIP[@]}" install --no-deps lerobot==0.3.3
echo "(pip's notes that lerobot 0.3.3 requires torch<2.8, torchvision, wandb, ... are expected: see the top of this file)"
# shellcheck disable=SC2086  # TOP_LEVEL is a list of package names
"${PIP[@]}" install -c "$VENV_CONSTRAINTS_FILE" $TOP_LEVEL

# 3. The torchvision stand-in (a real one is removed if present: it cannot be imported here).
install_torchvision_stub "$VENV" lerobot-v21

# 4. Check and stamp.
smoke_test
finish_venv "lerobot v2.1 venv" "$VENV" "$STAMP" "$want_stamp" "$start"
