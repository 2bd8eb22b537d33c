"""The quality lab's training on the real host (a few steps: the machinery, not the quality): the base
model is the host's SD1.5 class at the lab's size; a concept LoRA trains with the base frozen and its
kohya file loads through the host's LoraLoader and the pack's stack like a downloaded one."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import comfy.model_management
import comfy.sample
import comfy.supported_models
import make_fixtures as fx
import nodes as host_nodes

from _host import HOST, REPO
from _util import stack

from comfyui_cmlora.nodes.loras import map_model_lora
from quality import train, world

NAME = "test_lab_orb.safetensors"  # written into the generated models' loras folder


def _scenes(**concepts):
    return lambda rng: world.Scene(**concepts, seed=rng.randrange(2**31))


def test_the_lab_trains_a_base_and_a_lora_that_loads_like_a_downloaded_file(sd15, models_dir):
    model = train.lab_model(seed=0)
    assert isinstance(model.model_config, comfy.supported_models.SD15) and model.diffusion_model.in_channels == 48
    captions = train.Captions(sd15[1])
    before = {k: v.clone() for k, v in model.diffusion_model.state_dict().items()}
    losses = train.train(model, model.diffusion_model.parameters(), train.concept_sampler(_scenes(), {}), captions,
                         steps=3, batch=4)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    trained = {k: v.clone() for k, v in model.diffusion_model.state_dict().items()}
    assert sum(not torch.equal(before[k], trained[k]) for k in before) > len(before) // 2

    adapters = train.LoraAdapters(model, rank=4, seed=1)
    blocks = sum(1 for name, _ in model.diffusion_model.named_modules() if name.endswith("transformer_blocks.0"))
    assert len(adapters.layers) == 10 * blocks  # q, k, v, out of both attentions and the two feed-forward layers
    losses = train.train(model, adapters.parameters(), train.concept_sampler(_scenes(character="orb"), {"orb": "sks"}),
                         captions, steps=3, batch=4, seed=1)
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.equal(trained[k], v) for k, v in model.diffusion_model.state_dict().items())  # base frozen
    assert all(float(u.detach().abs().max()) > 0 for u in adapters.up.values())  # every adapter learned something

    x, t = torch.randn(2, 48, 16, 16, generator=torch.Generator().manual_seed(4)), torch.tensor([500.0, 250.0])
    context = captions(["sks orb character", "a figure"])
    for layer in adapters.layers:  # the file holds fp16 factors: compare the model call on those
        adapters.down[layer].data = adapters.down[layer].data.half().float()
        adapters.up[layer].data = adapters.up[layer].data.half().float()
    with torch.no_grad():
        with_adapters = model.diffusion_model(x, t, context=context)
    tensors = adapters.save_kohya(models_dir / "loras" / NAME, trigger="sks", concept="orb")
    adapters.remove()
    assert len(tensors) == 3 * len(adapters.layers) and all(k.startswith("lora_unet_") for k in tensors)

    # the host's own LoraLoader on the lab model gives the same model call
    patcher = fx.cpu_patcher(model)
    loaded = host_nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, NAME, 1.0)[0]
    comfy.model_management.load_models_gpu([loaded])
    with torch.no_grad():
        by_host = loaded.model.diffusion_model(x, t, context=context)
    comfy.model_management.unload_all_models()
    assert torch.allclose(by_host, with_adapters, atol=1e-4 * float(with_adapters.abs().max())), \
        (by_host - with_adapters).abs().max()
    assert not torch.allclose(by_host, fx.cpu_patcher(model).model.diffusion_model(x, t, context=context), atol=1e-6)
    assert all(torch.equal(trained[k], v) for k, v in model.diffusion_model.state_dict().items())  # unpatched

    # the host's sampler samples it in the world's space: 48 channels at unit scale, no inpainting inputs
    assert torch.equal(model.process_latent_in(x), x)
    lat = torch.zeros(1, 48, 16, 16)
    pos, neg = [[captions(["sks orb character"]), {}]], [[captions([""]), {}]]
    out = comfy.sample.sample(loaded, comfy.sample.prepare_noise(lat, 1), 2, 3.0, "euler", "normal", pos, neg, lat,
                              seed=1, disable_pbar=True)
    assert out.shape == (1, 48, 16, 16) and torch.isfinite(out).all()
    assert world.from_latent(out).shape == (1, 3, 64, 64)

    # the pack's stack reads it like a downloaded kohya file: every key placed, the trigger from its metadata
    entry = stack((NAME, 1.0)).entries[0]
    assert entry.trigger == "sks"
    mapped = map_model_lora(patcher, entry, "test")
    assert mapped.unmapped == [] and mapped.n_mapped == len(adapters.layers)


@pytest.fixture(scope="module")
def smoke_lab(sd15, tmp_path_factory):
    """The smoke recipe's models (a few steps of training: the plumbing, not the quality), trained once."""
    from quality import lab

    cache = tmp_path_factory.mktemp("quality")
    logs: list[str] = []
    return lab.train_lab(lab.SMOKE, sd15[1], cache, log=logs.append), cache


def test_the_lab_trains_its_models_once_per_recipe(sd15, smoke_lab):
    """``lab.train_lab`` writes the base model and one LoRA per concept (a smoke recipe: a few steps),
    under a folder named by the recipe; the same recipe again finds them and trains nothing; the base
    file loads back into the lab model; each LoRA carries its concept's trigger word."""
    from quality import lab

    logs: list[str] = []
    files, tmp_path = smoke_lab
    assert files.folder == tmp_path / lab.SMOKE.digest() and files.complete()
    assert files.base.parent == tmp_path / f"base-{lab.SMOKE.base_digest()}"
    assert len(list((files.folder / "loras").iterdir())) == len(lab.CONCEPT_NAMES) == 15
    stamps = {p: p.stat().st_mtime_ns for p in files.folder.rglob("*.safetensors")}
    again = lab.train_lab(lab.SMOKE, sd15[1], tmp_path, log=logs.append)
    assert again.folder == files.folder and logs[-1].startswith("lab: trained models found")
    assert stamps == {p: p.stat().st_mtime_ns for p in files.folder.rglob("*.safetensors")}
    assert lab.Recipe(seed=1).digest() != lab.Recipe().digest() != lab.SMOKE.digest()

    from safetensors import safe_open
    from safetensors.torch import load_file

    base = lab.load_base(files.base)
    saved = load_file(str(files.base))
    assert all(torch.equal(v.float(), saved[k].float()) for k, v in base.diffusion_model.state_dict().items())
    for name in ("orb", "checker"):
        with safe_open(str(files.lora(name)), "pt") as f:
            tags = json.loads(f.metadata()["ss_tag_frequency"])
        assert lab.TRIGGERS[name] in next(iter(tags.values()))
    assert len(set(lab.TRIGGERS.values())) == 15


def _quality(out, cache, models_dir, *args):
    """scripts/quality.sh's command (the host set up by the test session)."""
    env = {**os.environ, "CMLORA_QUALITY_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-m", "quality.cli", "--host", str(HOST), "--models-dir", str(models_dir),
                           "--smoke", "--out", str(out), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    (out / "cli.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), done.stdout


def _demo_grid(server, tmp_path):
    """The demo's lab picture (scripts/demo.py) on a server given the lab's files: Compare Methods on the
    lab model, the composition and seed read from the kept models' demo.json."""
    import demo

    kept = tmp_path / "kept"
    kept.mkdir()
    (tmp_path / "demo_out").mkdir()
    (kept / "demo.json").write_text(json.dumps({"concepts": ["orb", "red", "dusk"], "seed": 3, "why": "a test"}))
    original, demo.LAB_MODELS = demo.LAB_MODELS, kept
    try:
        return demo.run_lab_compare(server, tmp_path / "demo_out", tmp_path / "a")
    finally:
        demo.LAB_MODELS = original


def test_the_lab_evaluates_every_method_on_one_server_or_two_alike(smoke_lab, models_dir, tmp_path):
    """The smoke evaluation end to end, through the pack's nodes on real ComfyUI servers: every method at
    N = 2 and 3, the validation and the report written; sharded over two servers started apart, the results
    equal one server's (times aside)."""
    from comfy_client import Server
    from quality import report

    files, cache = smoke_lab
    one, log = _quality(tmp_path / "one", cache, models_dir)
    assert "lab: trained models found" in log  # the CLI trains nothing the cache holds
    assert set(one["methods"]) == {"base", "merge", "switch", "composite", "cmlora", "clora", "regions"}
    assert all(set(by_n) == {"2", "3"} and all(row["images"] == 2 for row in by_n.values())
               for by_n in one["methods"].values())
    assert set(one["validation"]["holds"]) == {"detectors", "each_lora_alone", "base_alone", "merge_loses_concepts"}
    assert one["validation"]["detectors_on_held_out_renders"]["all"] >= 0.95
    assert set(one["profile_split"]) == {c for combo in one["compositions"] for c in combo}
    text = (tmp_path / "one" / "QUALITY.md").read_text()
    assert "## 1. The lab validates itself" in text and "| regions | 3 |" in text
    assert (tmp_path / "one" / "recall.png").stat().st_size > 1000

    config = files.folder / "server.yaml"
    cores = max(1, (os.cpu_count() or 2) // 2)  # two servers on this machine share its cores
    with Server(HOST, output_dir=tmp_path / "a", extra_model_paths=config, threads=cores) as a, \
            Server(HOST, output_dir=tmp_path / "b", extra_model_paths=config, threads=cores) as b:
        two, log = _quality(tmp_path / "two", cache, models_dir, "--servers", f"{a.url},{b.url}")
        grid = _demo_grid(a, tmp_path)
    assert report.comparable(two) == report.comparable(one)
    assert grid["images"][0].stat().st_size > 1000
    compared = next(t for t in grid["report"] if "FLOPs" in t)  # Compare Methods' report (the stack nodes' first)
    ran = [line.split(":")[0] for line in compared.splitlines() if " s (sampling)" in line]
    assert ran == ["base", "merge", "switch", "composite", "cmlora"], compared
    for server in ("a", "b"):  # each server ran its share of the jobs
        assert len(list((tmp_path / server / "lab").glob("*.png"))) >= 10
