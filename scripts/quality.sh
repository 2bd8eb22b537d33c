#!/usr/bin/env bash
# The quality lab: train the lab's model and LoRAs once (cached under .cache/quality), evaluate every
# method through the pack's nodes on ComfyUI servers, and write QUALITY.md, results.json and a plot
# (quality/report/ unless --out). Options: --list, --compositions FILE, --seeds N, --out DIR,
# --servers URL,..., --smoke (see: bash scripts/quality.sh --help).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/env.sh"
cd "$repo"
exec "$python" -m quality.cli --host "$host" "$@"
