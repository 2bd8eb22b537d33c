"""Where the host is, and how the tests import it (shared by the conftest files)."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HOST = Path(os.environ.get("COMFYUI_PATH") or REPO / ".host" / "ComfyUI")
CACHE = Path(os.environ.get("CMLORA_TEST_CACHE") or REPO / ".cache" / "test-models")

# The core is importable as a top-level package for host-free tests.
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))


def import_host():
    """Put the host first on sys.path (its ``nodes`` module must win) and force CPU."""
    if not (HOST / "main.py").exists():
        pytest.skip(f"no ComfyUI host at {HOST}; run scripts/setup.sh", allow_module_level=True)
    for p in (str(HOST / "custom_nodes"), str(HOST)):
        if p in sys.path:
            sys.path.remove(p)
        sys.path.insert(0, p)
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management  # noqa: F401  (reads args.cpu now)
    sys.path.insert(0, str(REPO / "scripts"))
    return importlib.import_module("comfyui_cmlora")
