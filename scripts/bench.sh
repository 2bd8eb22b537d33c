#!/usr/bin/env bash
# The benchmark: FLOPs of every method (meta device) and wall time / peak memory beside merge.
# Sets up the environment first if needed. Arguments go to `python -m benchmarks`, e.g.
#   scripts/bench.sh --markdown BENCHMARKS.md     also write the tables into BENCHMARKS.md
#   scripts/bench.sh --device cuda                timing at full size in fp16 on a CUDA GPU
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
host="$(bash "$repo/scripts/setup.sh" | tail -n 1)"
venv="${CMLORA_VENV:-$repo/.venv}"
cd "$repo"
COMFYUI_PATH="$host" exec "$venv/bin/python" -m benchmarks "$@"
