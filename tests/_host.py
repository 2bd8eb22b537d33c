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
# The browser of the frontend tests: Debian's own chromium package, never one Playwright downloads.
CHROMIUM = Path(os.environ.get("CMLORA_CHROMIUM") or "/usr/bin/chromium")

# The core is importable as a top-level package for host-free tests.
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))


def browser_missing() -> str | None:
    """Why the browser tests cannot run here (no Playwright, no Chromium), or None when they can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return ("Playwright is not installed in this environment: run scripts/setup.sh "
                "(it installs the pinned playwright from scripts/host-requirements.txt)")
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        return (f"no browser at {CHROMIUM}: install Debian's chromium (apt-get install chromium) "
                "or point CMLORA_CHROMIUM at a Chromium binary")
    return None


def import_host():
    """Put the host first on sys.path (its ``nodes`` module must win), force CPU, and use PyTorch's
    attention as ``--use-pytorch-cross-attention`` does: on the CPU the host would pick its
    sub-quadratic attention, slower there (BENCHMARKS.md, "Attention on the CPU");
    tests/host/test_host_features.py runs the pack on that default too."""
    if not (HOST / "main.py").exists():
        pytest.skip(f"no ComfyUI host at {HOST}; run scripts/setup.sh", allow_module_level=True)
    for p in (str(HOST / "custom_nodes"), str(HOST)):
        if p in sys.path:
            sys.path.remove(p)
        sys.path.insert(0, p)
    from comfy.cli_args import args

    args.cpu = True
    args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401  (reads both now)
    sys.path.insert(0, str(REPO / "scripts"))
    return importlib.import_module("comfyui_cmlora")
