#!/usr/bin/env bash
# Run the test suite against a real ComfyUI host (set up first if needed; see setup.sh for
# COMFYUI_SOURCE / COMFYUI_PATH). Extra arguments go to pytest, e.g.
#   scripts/test.sh tests/core -k switch
#   COMFYUI_SOURCE=/path/to/ComfyUI scripts/test.sh
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/env.sh"
cd "$repo"
COMFYUI_PATH="$host" exec "$python" -m pytest "$@"
