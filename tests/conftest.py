"""Test setup: the real ComfyUI host in-process (CPU), and generated models and LoRA files.

Pure core tests (tests/core) need none of this; integration tests (tests/host) import the
host found by scripts/setup.sh (``.host/ComfyUI``) or at ``COMFYUI_PATH``.
"""
from __future__ import annotations

import resource

import pytest

from _host import CACHE, import_host


@pytest.fixture(scope="session")
def pack():
    return import_host()


@pytest.fixture(scope="session")
def models_dir(pack):
    """The generated checkpoint, the DiT files this host loads and every LoRA file the tests use,
    registered with the host (written once; both hosts' passes share them where they are the same)."""
    import folder_paths
    import make_fixtures as fx

    CACHE.mkdir(parents=True, exist_ok=True)
    fx.ensure_demo_models(CACHE)
    fx.ensure_test_loras(CACHE)
    # the DiT files too, now, while this process holds no model: writing one takes its size in memory
    for key, fixture in fx.DIT_FIXTURES.items():
        if fixture.unsupported() is None:
            fx.ensure_dit_model(CACHE, key)
            fx.ensure_dit_narrow_loras(CACHE, key)
    folder_paths.add_model_folder_path("checkpoints", str(CACHE / "checkpoints"), is_default=True)
    folder_paths.add_model_folder_path("loras", str(CACHE / "loras"), is_default=True)
    folder_paths.add_model_folder_path("diffusion_models", str(CACHE / "diffusion_models"), is_default=True)
    return CACHE


@pytest.fixture(scope="session")
def sd15(models_dir):
    """(model, clip, vae) of the generated SD1.5 checkpoint, through CheckpointLoaderSimple."""
    import nodes as host_nodes
    import make_fixtures as fx

    return host_nodes.CheckpointLoaderSimple().load_checkpoint(fx.CHECKPOINT)


@pytest.fixture(scope="session")
def sd15_narrow(sd15):
    """(model, clip, vae): the SD1.5 fixture's narrow twin, built in-process from the host's SD1.5
    model class at a fifth of the checkpoint's channels (no host detects SD1.5 at that width, so
    it has no file), with the checkpoint's text encoder and VAE. The tests that compare the pack's
    sampling with the host's LoraLoader run on it, with the ``test_<format>_narrow`` LoRA files;
    the loader-path tests (detection, ControlNet, inpainting checkpoints, the browser runs) keep
    the checkpoint."""
    import make_fixtures as fx

    _, clip, vae = sd15
    return fx.sd15_narrow_patcher(), clip, vae


@pytest.fixture(scope="session")
def sdxl(models_dir):
    """The generated SDXL-family diffusion model, through the host's UNETLoader (its detection)."""
    import make_fixtures as fx

    return fx.load_unet(fx.SDXL_UNET)


@pytest.fixture(scope="session")
def conds(sd15):
    _, clip, _ = sd15
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a sks cat in a garden"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize("blurry"))
    return pos, neg


def pytest_terminal_summary(terminalreporter):
    """The memory figures CI prints: the pytest process's peak resident memory, and the largest of
    the processes it started and waited for (the e2e tests' ComfyUI server, the demo's)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    terminalreporter.write_line(f"pytest peak RSS: {own:.1f} GiB (largest child process: {children:.1f} GiB)")
