#!/usr/bin/env bash
# The main job on a fresh machine: set up the environment and a real ComfyUI host, generate
# a random-weight model and LoRAs, queue the example workflows through the server's HTTP
# API on the CPU, and write the images and a report to demo_output/ (or $1).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/env.sh"
out="${1:-$repo/demo_output}"
exec "$python" "$repo/scripts/demo.py" --host "$host" --out "$out" "${@:2}"
