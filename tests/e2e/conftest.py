"""End-to-end tests: a real ComfyUI server with the pack and the generated models, shared by the modules."""
import sys

import pytest

from _host import HOST, REPO, import_host

import_host()
sys.path.insert(0, str(REPO / "scripts"))
from comfy_client import Server  # noqa: E402


@pytest.fixture(scope="session")
def server(models_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    paths = tmp / "extra_model_paths.yaml"
    paths.write_text(f"cmlora_test:\n  base_path: {models_dir}\n  checkpoints: checkpoints\n  loras: loras\n")
    with Server(HOST, output_dir=tmp / "output", extra_model_paths=paths, log_path=tmp / "comfyui.log") as s:
        s.output_dir_path = tmp / "output"
        yield s
