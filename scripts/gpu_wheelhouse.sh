#!/usr/bin/env bash
# Download (here, from PyPI) the wheels that benchmarks/gpu_suite.sh installs on a GPU machine that has torch and
# transformers (and their own dependencies) but no package registry:
#     bash scripts/gpu_wheelhouse.sh DIR          # e.g. .gpu-wheels (git-ignored), carried to the GPU machine
#
# Only what the suite imports beyond torch and transformers: pydantic and pydantic-settings (fplus.settings), peft
# and accelerate (LoRA), psutil (theirs), pillow (the backbone's image processor). Not av, pyarrow, h5py, typer,
# rich: the suite does not import them (it times the latent encoders alone, not the dataset decoding).
#
# One line per group in DIR/groups.txt, "KEEP|PIN PIN ...": gpu_suite.sh installs a group's pinned wheels only when
# the machine lacks KEEP's distribution or has a version outside KEEP (the fplus requirement, pyproject.toml), so a
# working preinstalled package is never shadowed; a group's pins go in together (pydantic needs its exact
# pydantic-core). Pins are the versions fplus's own venv is tested with.
# Wheels for CPython 3.11 and 3.12 (GPU_WHEEL_PYTHONS), linux x86_64 manylinux: fplus needs Python >= 3.11, so
# 3.10 wheels would serve nothing. The total must stay under 40 MiB (the GPU tool carries 64 MiB in all).
set -euo pipefail

DIR=${1:?usage: scripts/gpu_wheelhouse.sh DIR}
PY=${PYTHON:-python3}
PYTHONS=${GPU_WHEEL_PYTHONS:-3.11 3.12}
MAX_MIB=40
GROUPS_LINES=(
    "pydantic>=2.10|pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0"
    "pydantic-settings>=2.8|pydantic-settings==2.16.3 python-dotenv==1.2.4"
    "accelerate>=1.10|accelerate==1.15.0"
    "peft>=0.17|peft==0.21.2"
    "psutil>=5|psutil==7.2.2"
    "pillow>=11|pillow==13.0.0"
)

mkdir -p "$DIR"
pins=()
for line in "${GROUPS_LINES[@]}"; do
    read -ra group <<<"${line#*|}"
    pins+=("${group[@]}")
done
platforms=()
for n in 2_34 2_28 2_27 2_17; do platforms+=(--platform "manylinux_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64)
for version in $PYTHONS; do
    echo "wheels for CPython $version"
    "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --implementation cp \
        --python-version "$version" "${platforms[@]}" -d "$DIR" "${pins[@]}"
done
printf '%s\n' "# KEEP|PIN ...: written by scripts/gpu_wheelhouse.sh, read by benchmarks/gpu_suite.sh" \
    "${GROUPS_LINES[@]}" >"$DIR/groups.txt"

ls -1 "$DIR"/*.whl
bytes=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
mib=$(( (bytes + 1048575) / 1048576 ))
echo "wheelhouse $DIR: $(ls "$DIR"/*.whl | wc -l) wheels, ${mib} MiB (limit ${MAX_MIB} MiB)"
if (( mib > MAX_MIB )); then
    echo "gpu_wheelhouse.sh: $DIR holds ${mib} MiB, over ${MAX_MIB} MiB: remove stale wheels (rm -r $DIR) or set" \
         "GPU_WHEEL_PYTHONS to the GPU machine's Python only" >&2
    exit 1
fi
