"""Flux.1 on the real host: every LoRA layout maps, and merge, switch, composite, step ranges and
regions equal the host's own LoraLoader, on a Flux.1 [dev] model with one block of each kind at full
width (make_fixtures.FLUX_CONFIG), loaded by the host's UNETLoader.

No full-size T5-XXL or CLIP-L can run on the CPU here, so the conditioning is built in-process: the
tensors the text encoders would give (a T5 sequence of width 4096, a pooled CLIP-L vector of 768)
with Flux's guidance value, as CLIPTextEncodeFlux puts them in the conditioning.
"""
from __future__ import annotations

import pytest
import torch

import comfy.model_management
import comfy.sample

from _util import CallRecorder, apply, call_out, lora_loader, stack, stepwise_reference, weight_digests

from comfyui_cmlora.cmlora_core.errors import CMLoRAError
from comfyui_cmlora.nodes.loras import map_model_lora
from comfyui_cmlora.nodes.runtime import runtime_of

FORMATS = ["flux_kohya", "flux_bfl", "flux_diffusers", "flux_xlabs", "flux_lokr"]
SLICED = {"flux_diffusers", "flux_xlabs", "flux_lokr"}  # patch slices of the fused qkv / linear1
LATENT = 8  # 64x64 pixels: 4x4 image tokens of Flux's 2x2 patches


@pytest.fixture(scope="module")
def flux(models_dir):
    """The generated Flux.1 [dev] diffusion model (one block of each kind at full width), through the
    host's UNETLoader (its detection), with its LoRA files (make_fixtures.FLUX_LORAS). Module-scoped:
    at about 2 GB in float32, plus what a LoRA-patched clone backs up, it is freed when this module
    ends instead of staying for the rest of the session."""
    import gc

    import make_fixtures as fx

    fx.ensure_flux_models(models_dir)
    model = fx.load_unet(fx.FLUX_UNET)
    yield model
    comfy.model_management.unload_all_models()
    del model
    gc.collect()


@pytest.fixture(autouse=True)
def _unload_after(flux):
    """Each test's LoRA-patched clones go when it ends (the host keeps the last one loaded)."""
    yield
    comfy.model_management.unload_all_models()


def file(stem: str) -> str:
    return f"test_{stem}.safetensors"


@pytest.fixture(scope="module")
def flux_conds():
    g = torch.Generator().manual_seed(5)

    def cond(scale):
        return [[torch.randn(1, 6, 4096, generator=g) * scale,
                 {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]]

    return cond(1.0), cond(0.5)


def sample(model, conds, steps=2, cfg=1.0, seed=3, callback=None):
    """KSampler's path; cfg 1 (Flux dev's usual) makes one model call per step."""
    pos, neg = conds
    lat = torch.zeros(1, 16, LATENT, LATENT)
    noise = comfy.sample.prepare_noise(lat, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", pos, neg, lat, seed=seed,
                               disable_pbar=True, callback=callback)


def test_fixture_is_flux_dev_as_the_host_detects_it(flux):
    assert type(flux.model).__name__ == "Flux"
    config = flux.model.model_config.unet_config
    assert config["hidden_size"] == 3072 and config["guidance_embed"]
    assert (config["depth"], config["depth_single_blocks"]) == (1, 1)


@pytest.mark.parametrize("stem", FORMATS)
def test_every_layout_maps_all_its_keys_as_the_host_does(flux, stem):
    st = stack((file(stem), 1.0))
    mapped = map_model_lora(flux, st.entries[0], "test")
    assert mapped.unmapped == [] and mapped.n_mapped > 0
    ref = lora_loader(flux, (file(stem), 1.0))
    host_keys = {(k, p[3]) for k, patches in ref.patches.items() for p in patches}
    ours = {(k, None) if isinstance(k, str) else (k[0], k[1]) for k in mapped.patches}
    assert ours == host_keys
    sliced = [k for k in mapped.patches if not isinstance(k, str)]
    assert bool(sliced) == (stem in SLICED)
    if stem == "flux_diffusers":  # q, k, v of both streams and linear1's four parts are slices
        assert {k[0] for k in sliced} == {"diffusion_model.double_blocks.0.img_attn.qkv.weight",
                                          "diffusion_model.double_blocks.0.txt_attn.qkv.weight",
                                          "diffusion_model.single_blocks.0.linear1.weight"}


def test_merge_equals_chained_lora_loader_model_only(flux, flux_conds):
    specs = [(file("flux_diffusers"), 0.8), (file("flux_kohya"), 0.6)]
    ours = sample(apply(flux, stack(*specs), "merge"), flux_conds)
    ref = sample(lora_loader(flux, *specs), flux_conds)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("stem", ["flux_diffusers", "flux_lokr"])
def test_switch_with_one_lora_equals_lora_loader_at_every_step(flux, flux_conds, stem):
    before = weight_digests(flux)
    seen, ref_seen = [], []
    ours = sample(apply(flux, stack((file(stem), 0.9)), "switch", interval=1), flux_conds, steps=3,
                  callback=lambda i, x0, x, n: seen.append(x0.clone()))
    ref = sample(lora_loader(flux, (file(stem), 0.9)), flux_conds, steps=3,
                 callback=lambda i, x0, x, n: ref_seen.append(x0.clone()))
    assert len(seen) == 3 and all(torch.equal(a, b) for a, b in zip(seen, ref_seen))
    assert torch.equal(ours, ref)
    after = weight_digests(flux)
    assert before == after  # the base model, bit for bit


def test_composite_is_the_mean_of_lora_loader_predictions_in_one_call_per_chunk(flux, flux_conds):
    stems = ["flux_diffusers", "flux_xlabs", "flux_lokr"]
    before = weight_digests(flux)
    outer = CallRecorder()
    model = outer.attach(flux)
    patched = apply(model, stack(*[(file(s), 1.0) for s in stems]), "composite")
    sample(patched, flux_conds, steps=2, cfg=2.0)  # cond and uncond: one host chunk of two rows
    assert len(outer.calls) == 2 and all(c["x"].shape[0] == 2 for c in outer.calls)
    assert runtime_of(patched).last_trace.call_rows == [2 * len(stems)] * 2  # one forward per chunk
    refs = [lora_loader(flux, (file(s), 1.0)) for s in stems]
    for call in outer.calls:
        expected = sum(call_out(r, call) for r in refs) / len(refs)
        assert torch.allclose(call["out"], expected, atol=2e-4), (call["out"] - expected).abs().max()
    after = weight_digests(flux)
    assert before == after


@pytest.mark.parametrize("method", ["merge", "composite"])
def test_step_range_on_the_first_half_equals_lora_loader_then_the_base_model(flux, flux_conds, method):
    spec = {"lora_name": file("flux_diffusers"), "strength_model": 1.0, "end_at": 0.5}
    ours = sample(apply(flux, stack(spec), method), flux_conds, steps=4)
    lora = lora_loader(flux, (file("flux_diffusers"), 1.0))
    expected = stepwise_reference([lora, lora, flux, flux], flux_conds, "euler", 4, seed=3, cfg=1.0,
                                  scheduler="simple", latent_shape=(1, 16, LATENT, LATENT))
    assert torch.allclose(ours, expected, atol=1e-4), (ours - expected).abs().max()
    assert not torch.allclose(ours, sample(lora, flux_conds, steps=4), atol=1e-3)
    assert not torch.allclose(ours, sample(flux, flux_conds, steps=4), atol=1e-3)


def test_regions_on_flux_image_tokens(flux, flux_conds):
    """Inside LoRA A's mask the prediction is A's, outside every mask the unmasked LoRA's."""
    mask = torch.zeros(1, 64, 64)
    mask[..., :32] = 1.0  # the left half of the image: 4 of the 8 latent columns, 2 of 4 token columns
    st = stack({"lora_name": file("flux_diffusers"), "strength_model": 1.0, "mask": mask, "mask_feather": 0},
               (file("flux_kohya"), 1.0))
    outer = CallRecorder()
    sample(apply(outer.attach(flux), st, "regions"), flux_conds, steps=1)
    (call,) = outer.calls
    inside = call_out(lora_loader(flux, (file("flux_diffusers"), 1.0)), call)
    outside = call_out(lora_loader(flux, (file("flux_kohya"), 1.0)), call)
    out = call["out"]
    assert torch.allclose(out[..., :4], inside[..., :4], atol=2e-4)
    assert torch.allclose(out[..., 4:], outside[..., 4:], atol=2e-4)
    assert not torch.allclose(inside, outside, atol=1e-3)


def test_wrong_architecture_loras_name_the_file_and_its_base(flux, sdxl):
    with pytest.raises(CMLoRAError) as e:
        apply(flux, stack(("test_kohya.safetensors", 1.0)), "composite")
    assert "test_kohya.safetensors" in str(e.value) and "Flux" in str(e.value) and "SD1" in str(e.value)
    with pytest.raises(CMLoRAError) as e:
        apply(sdxl, stack((file("flux_kohya"), 1.0)), "composite")
    assert "test_flux_kohya.safetensors" in str(e.value) and "looks like a Flux LoRA" in str(e.value)


def test_cmlora_runs_on_flux_without_the_deep_cache_and_names_the_limit_with_it(flux, flux_conds):
    """CMLoRA's schedule and prediction cache work on any model; its deep-feature cache splits a UNet."""
    from comfyui_cmlora.nodes.apply_nodes import ApplyNode
    from comfyui_cmlora.nodes.cmlora_nodes import SchedulerNode

    st = stack((file("flux_diffusers"), 1.0), (file("flux_kohya"), 1.0))

    def scheduled(cache):
        sched = SchedulerNode.execute(
            stack=st, mode="offline", switch_interval=1, cache=cache, refresh="uniform", refresh_interval=2,
            h_to_l_fraction=0.5, online_threshold=0.5, w_dom="constant", dominant_full=True, preview_steps=8).args[0]
        return ApplyNode.execute(model=flux, stack=st, method="cmlora", switch_interval=1, schedule=sched).args[0]

    out = sample(scheduled("prediction"), flux_conds, steps=3)
    assert torch.isfinite(out).all()
    with pytest.raises(CMLoRAError) as e:
        sample(scheduled("deep"), flux_conds, steps=2)
    assert "needs a UNet" in str(e.value) and "Flux" in str(e.value) and "cache" in str(e.value)


def test_clora_refuses_flux_before_encoding_anything(flux, sd15):
    """(Any CLIP passes the input check; SD1.5's is at hand. The model is refused before it is used.)"""
    from comfyui_cmlora.nodes.clora_nodes import AttentionMasker

    st = stack({"lora_name": file("flux_diffusers"), "strength_model": 1.0, "category": "character", "concept": "cat"})
    with pytest.raises(CMLoRAError) as e:
        AttentionMasker.execute(model=flux, clip=sd15[1], stack=st, prompt="a cat", temperature=0.5, step_size=20.0,
                                stop_fraction=0.5, extra_iterations=0, mask_threshold=0.4, attention="conditional",
                                style_scope="global")
    assert "Flux" in str(e.value) and "regions" in str(e.value)
