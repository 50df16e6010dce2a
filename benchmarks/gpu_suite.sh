#!/usr/bin/env bash
# The GPU suite in one command, on a machine with only torch and transformers and no package registry:
#     bash benchmarks/gpu_suite.sh [WHEELHOUSE] [gpu_suite.py options, e.g. --smoke, --out FILE]
#
# WHEELHOUSE (made here by scripts/gpu_wheelhouse.sh): the groups of DIR/groups.txt that this python lacks (or has
# at a version fplus does not accept) are installed from it with pip --no-index --no-deps into a fresh target
# directory (FPLUS_GPU_SITE, default $TMPDIR/fplus-gpu-site) put on PYTHONPATH; nothing is installed into the
# machine's python. fplus itself is this source tree, also on PYTHONPATH (building it would need hatchling).
# Without WHEELHOUSE, the python as it is (PYTHON, default python3).
#
# Then benchmarks/gpu_suite.py runs with what is left of GPU_SUITE_BUDGET_S (default 450 s, all included): it
# skips a part that the time left cannot cover (recording why) and rewrites its JSON after every part
# (benchmarks/results/gpu_suite-<gpu name>.json). A hard limit of 20 s past the budget stops it with SIGTERM, on
# which it writes what it has and exits.
set -euo pipefail

start=$SECONDS
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-python3}
budget=${GPU_SUITE_BUDGET_S:-450}
wheels=""
if [[ $# -gt 0 && $1 != -* ]]; then
    wheels=$1
    shift
fi

if [[ -n $wheels ]]; then
    if [[ ! -f $wheels/groups.txt ]]; then
        echo "gpu_suite.sh: $wheels/groups.txt not found: make the wheelhouse first (bash scripts/gpu_wheelhouse.sh" \
             "$wheels) and carry it to this machine" >&2
        exit 2
    fi
    site=${FPLUS_GPU_SITE:-${TMPDIR:-/tmp}/fplus-gpu-site}
    rm -rf "$site"
    mkdir -p "$site"
    # the pins of each group whose distribution is missing here or outside its KEEP requirement
    pins=$("$py" - "$wheels/groups.txt" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

from packaging.requirements import Requirement

for line in open(sys.argv[1]):
    line = line.strip()
    if not line or line.startswith("#"):
        continue
    keep, pins = line.split("|")
    need = Requirement(keep)
    try:
        have = version(need.name)
    except PackageNotFoundError:
        have = None
    if have is not None and need.specifier.contains(have, prereleases=True):
        print(f"keeping {need.name} {have} ({need})", file=sys.stderr)
    else:
        print(f"installing {pins} ({need.name}: {have or 'missing'}, fplus needs {need})", file=sys.stderr)
        print(pins)
PY
)
    if [[ -n $pins ]]; then
        # shellcheck disable=SC2086  # one pin per word
        "$py" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
            --find-links "$wheels" --target "$site" $pins
    fi
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

left=$((budget - (SECONDS - start)))
echo "gpu_suite.sh: $((SECONDS - start)) s to install, ${left} s of the ${budget} s budget left"
exec timeout -k 10 $((left + 20)) "$py" "$repo/benchmarks/gpu_suite.py" --budget-s "$left" "$@"
