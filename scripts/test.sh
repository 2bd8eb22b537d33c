#!/usr/bin/env bash
# Run the test suite against a real ComfyUI host (set up first if needed).
# Extra arguments go to pytest, e.g. scripts/test.sh tests/core -k switch
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
host="$(bash "$repo/scripts/setup.sh" | tail -n 1)"
venv="${CMLORA_VENV:-$repo/.venv}"
cd "$repo"
COMFYUI_PATH="$host" exec "$venv/bin/python" -m pytest "$@"
