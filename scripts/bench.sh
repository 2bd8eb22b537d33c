#!/usr/bin/env bash
# The benchmark: FLOPs of every method (meta device) and wall time / peak memory beside merge.
# Sets up the environment first if needed. Arguments go to `python -m benchmarks`, e.g.
#   scripts/bench.sh --markdown BENCHMARKS.md     also write the tables into BENCHMARKS.md
#   scripts/bench.sh --device cuda                timing at full size in fp16 on a CUDA GPU
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/env.sh"
cd "$repo"
COMFYUI_PATH="$host" exec "$python" -m benchmarks "$@"
