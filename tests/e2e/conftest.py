"""End-to-end tests: a real ComfyUI server with the pack and the generated models, shared by the modules;
and a real browser (Debian's chromium driven by Playwright) for the frontend tests."""
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from _host import CHROMIUM, HOST, REPO, browser_missing, import_host

import_host()
sys.path.insert(0, str(REPO / "scripts"))
from comfy_client import Server  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ARTIFACTS = REPO / "test-artifacts" / "browser"
_written: list[Path] = []  # the screenshot folders this session wrote to (printed at the end)


_running: list[Server] = []  # the server the e2e modules share while they run


@pytest.fixture(scope="session")
def server(models_dir, tmp_path_factory):
    """One ComfyUI server for all e2e tests (they run one after another), started by the first that
    needs it and stopped after the last e2e test (pytest_runtest_teardown below), not at the end of
    the session: it holds about 5 GB, which the host tests after tests/e2e need on the 24 GB CI
    machine."""
    if not _running:
        tmp = tmp_path_factory.mktemp("server")
        paths = tmp / "extra_model_paths.yaml"
        paths.write_text(f"cmlora_test:\n  base_path: {models_dir}\n  checkpoints: checkpoints\n  loras: loras\n")
        s = Server(HOST, output_dir=tmp / "output", extra_model_paths=paths, log_path=tmp / "comfyui.log")
        s.__enter__()
        s.output_dir_path = tmp / "output"
        _running.append(s)
    return _running[0]


def _stop_server():
    while _running:
        _running.pop().__exit__(None, None, None)


def pytest_runtest_teardown(item, nextitem):
    e2e = Path(__file__).parent
    if nextitem is None or e2e not in nextitem.path.parents:
        _stop_server()


def pytest_sessionfinish(session):
    _stop_server()


def _no_browser(reason: str):
    """CI (.ci/run sets CMLORA_REQUIRE_BROWSER=1) must run the browser tests: there a missing browser
    fails them; elsewhere they are skipped with the reason."""
    if os.environ.get("CMLORA_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (CMLORA_REQUIRE_BROWSER=1: the browser tests must run here)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def browser():
    """Chromium from /usr/bin/chromium (or $CMLORA_CHROMIUM) through Playwright, headless, with a fresh
    profile; each test opens its own context (fresh storage)."""
    missing = browser_missing()
    if missing:
        _no_browser(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True, timeout=120_000)
        try:
            yield b
        finally:
            b.close()


def _host_label() -> str:
    version = HOST / "comfyui_version.py"
    found = re.search(r'__version__ = "([^"]+)"', version.read_text()) if version.exists() else None
    return f"comfyui-{found.group(1)}" if found else HOST.name


@pytest.fixture(scope="session")
def browser_artifacts():
    """The folder for this host's screenshots, emptied at the start of the session:
    test-artifacts/browser/comfyui-<version>/ (one folder per host, so CI's two passes keep both)."""
    folder = ARTIFACTS / _host_label()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    _written.append(folder)
    return folder


def pytest_terminal_summary(terminalreporter):
    for folder in _written:
        terminalreporter.write_line(f"browser test screenshots: {folder}")
