#!/usr/bin/env bash
# Build (or check) a small separate venv with openpi's websocket client, for testing `fplus serve` against the real
# client (tests/deploy/test_serve_openpi.py, FPLUS_OPENPI_VENV):
#     bash scripts/openpi_client_env.sh [VENV]          # VENV defaults to .openpi-venv in the repository
#
# Why a separate venv: openpi-client 0.1.2 pins numpy<2 (fplus needs numpy>=2) and imports typing_extensions
# without declaring it, so it is installed with numpy<2 and typing_extensions next to it. No torch here: the client
# only packs numpy arrays with msgpack and talks websockets.
# Idempotent: a finished venv whose pins match is only smoke-tested.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${1:-$HERE/../.openpi-venv}"
PYTHON="${PYTHON:-python3}"
start=$(date +%s)

# The top-level packages (openpi-client's own dependencies come with it: dm-tree, msgpack, pillow, websockets).
PACKAGES="openpi-client==0.1.2 numpy<2 typing_extensions"
STAMP="$VENV/.fplus-openpi-client"
want_stamp="$(printf '%s\n' "$PACKAGES" | sha256sum | cut -c1-16)"

smoke_test() {
    "$VENV/bin/python" - <<'EOF'
import numpy as np
from importlib.metadata import version
from openpi_client import msgpack_numpy, websocket_client_policy  # noqa: F401  (imports typing_extensions)

x = np.arange(6, dtype=np.float32).reshape(2, 3)
assert np.array_equal(msgpack_numpy.unpackb(msgpack_numpy.packb({"x": x}))["x"], x)
print(f"openpi-client {version('openpi-client')}, numpy {np.__version__}, websockets {version('websockets')}, "
      f"msgpack {version('msgpack')}")
EOF
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" ]] && smoke_test >/dev/null 2>&1; then
    echo "openpi client venv $VENV is up to date"
    exit 0
fi
echo "building the openpi client venv $VENV"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
# shellcheck disable=SC2086  # PACKAGES is a list of requirement specifiers
"$VENV/bin/python" -m pip --disable-pip-version-check -q install $PACKAGES
smoke_test
echo "$want_stamp" > "$STAMP"
echo "openpi client venv ready: $VENV ($(du -sh "$VENV" | cut -f1), $(( $(date +%s) - start )) s)"
