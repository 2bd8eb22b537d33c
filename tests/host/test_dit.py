"""Flux.1 [schnell], Flux.2, Z-Image and Qwen-Image on the real host: the parity tests of
test_flux.py (Flux.1 [dev]) for each DiT fixture of make_fixtures.DIT_FIXTURES (one block of each
kind, loaded by the host's UNETLoader).

A fixture the running host cannot load is skipped with the reason (a host without the model, or
whose detection reads the fixture's keys as another configuration: the host of late 2025 fixes
Flux.2 at 48 heads, the 32-billion-parameter width, which a CPU test cannot hold).

The text encoders of these models (T5-XXL and CLIP-L, Mistral-3 24B, Qwen3-4B, Qwen2.5-VL 7B)
cannot run on the CPU here, so the conditioning is built in-process: hidden states of each
encoder's width, with what the model's text-encode node adds (Flux.1's pooled CLIP-L vector,
Flux.2's guidance value).
"""
from __future__ import annotations

import gc

import pytest
import torch

import comfy.model_management
import make_fixtures as fx

from _util import CallRecorder, apply, call_out, lora_loader, stack, stepwise_reference, weight_digests

from comfyui_cmlora.cmlora_core.errors import CMLoRAError
from comfyui_cmlora.nodes.loras import map_model_lora
from comfyui_cmlora.nodes.runtime import runtime_of

SLICED = {"flux1_schnell_diffusers", "flux2_diffusers", "zimage_diffusers", "zimage_lokr"}  # on slices of fused layers
PIXELS = 64


@pytest.fixture(scope="module", params=sorted(fx.DIT_FIXTURES))
def dit(request, models_dir):
    """(fixture, model): one DiT fixture through the host's UNETLoader. Module-scoped and
    parametrized, so each model is loaded once and freed before the next one is."""
    fixture = fx.DIT_FIXTURES[request.param]
    reason = fixture.unsupported()
    if reason:
        pytest.skip(reason)
    fx.ensure_dit_model(models_dir, fixture.key)
    model = fx.load_unet(fixture.file)
    yield fixture, model
    comfy.model_management.unload_all_models()
    del model
    gc.collect()


@pytest.fixture(autouse=True)
def _unload_after():
    yield
    comfy.model_management.unload_all_models()


def file(stem: str) -> str:
    return f"test_{stem}.safetensors"


def conds(fixture):
    g = torch.Generator().manual_seed(5)

    def cond(scale):
        extra = dict(fixture.cond_extra)
        if fixture.pooled_dim:
            extra["pooled_output"] = torch.randn(1, fixture.pooled_dim, generator=g)
        return [[torch.randn(1, 6, fixture.context_dim, generator=g) * scale, extra]]

    return cond(1.0), cond(0.5)


def latent_shape(fixture, model):
    """An empty latent as the host's sampler node hands it on (a video-VAE latent, Qwen-Image's,
    gets its frame axis)."""
    channels, down = fixture.latent
    frames = (1,) if model.model.latent_format.latent_dimensions == 3 else ()
    return (1, channels, *frames, PIXELS // down, PIXELS // down)


def sample(fixture, model, steps=2, cfg=1.0, seed=3, callback=None):
    """KSampler's path (cfg 1: one model call per step)."""
    import comfy.sample

    pos, neg = conds(fixture)
    lat = torch.zeros(latent_shape(fixture, model))
    noise = comfy.sample.prepare_noise(lat, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", pos, neg, lat, seed=seed,
                               disable_pbar=True, callback=callback)


def close(a, b, tol=2e-4):
    """Equal up to float32 summation order, scaled to the outputs' size (Z-Image's are large)."""
    return torch.allclose(a, b, atol=tol * max(1.0, float(b.abs().max())), rtol=0)


def test_fixture_is_the_model_the_host_detects(dit):
    fixture, model = dit
    assert type(model.model.model_config).__name__ == fixture.host_class
    config = model.model.model_config.unet_config
    assert config["image_model"] == fixture.config["image_model"]
    # every setting this host's detection gives is the fixture's (an older host lacks some)
    assert all(config[k] == v for k, v in fixture.config.items() if k in config)


def test_every_layout_maps_all_its_keys_as_the_host_does(dit):
    fixture, model = dit
    for stem in fixture.loras:
        mapped = map_model_lora(model, stack((file(stem), 1.0)).entries[0], "test")
        assert mapped.unmapped == [] and mapped.n_mapped > 0, stem
        ref = lora_loader(model, (file(stem), 1.0))
        host_keys = {(k, p[3]) for k, patches in ref.patches.items() for p in patches}
        ours = {(k, None) if isinstance(k, str) else (k[0], k[1]) for k in mapped.patches}
        assert ours == host_keys, stem
        sliced = [k for k in mapped.patches if not isinstance(k, str)]
        assert bool(sliced) == (stem in SLICED), stem


def test_merge_equals_chained_lora_loader_model_only(dit):
    fixture, model = dit
    specs = [(file(s), w) for s, w in zip(fixture.loras, (0.8, 0.6))]
    ours = sample(fixture, apply(model, stack(*specs), "merge"))
    ref = sample(fixture, lora_loader(model, *specs))
    assert torch.equal(ours, ref)


def test_switch_with_one_lora_equals_lora_loader_at_every_step(dit):
    """A LoRA on slices where the model has fused layers, and the base bit-identical afterwards."""
    fixture, model = dit
    stem = next((s for s in fixture.loras if s in SLICED), next(iter(fixture.loras)))
    before = weight_digests(model)
    seen, ref_seen = [], []
    ours = sample(fixture, apply(model, stack((file(stem), 0.9)), "switch", interval=1), steps=3,
                  callback=lambda i, x0, x, n: seen.append(x0.clone()))
    ref = sample(fixture, lora_loader(model, (file(stem), 0.9)), steps=3,
                 callback=lambda i, x0, x, n: ref_seen.append(x0.clone()))
    assert len(seen) == 3 and all(torch.equal(a, b) for a, b in zip(seen, ref_seen))
    assert torch.equal(ours, ref)
    after = weight_digests(model)
    assert before == after


def test_composite_is_the_mean_of_lora_loader_predictions_in_one_call_per_chunk(dit):
    fixture, model = dit
    stems = list(fixture.loras)
    before = weight_digests(model)
    outer = CallRecorder()
    patched = apply(outer.attach(model), stack(*[(file(s), 1.0) for s in stems]), "composite")
    sample(fixture, patched, steps=2, cfg=2.0)  # cond and uncond: one host chunk of two rows
    assert len(outer.calls) == 2 and all(c["x"].shape[0] == 2 for c in outer.calls)
    assert runtime_of(patched).last_trace.call_rows == [2 * len(stems)] * 2
    refs = [lora_loader(model, (file(s), 1.0)) for s in stems]
    for call in outer.calls:
        expected = sum(call_out(r, call) for r in refs) / len(refs)
        assert close(call["out"], expected), (call["out"] - expected).abs().max()
    after = weight_digests(model)
    assert before == after


def test_step_range_on_the_first_half_equals_lora_loader_then_the_base_model(dit):
    fixture, model = dit
    stem = next(iter(fixture.loras))
    spec = {"lora_name": file(stem), "strength_model": 1.0, "end_at": 0.5}
    ours = sample(fixture, apply(model, stack(spec), "composite"), steps=4)
    lora = lora_loader(model, (file(stem), 1.0))
    expected = stepwise_reference([lora, lora, model, model], conds(fixture), "euler", 4, seed=3, cfg=1.0,
                                  scheduler="simple", latent_shape=latent_shape(fixture, model))
    assert close(ours, expected, 1e-4), (ours - expected).abs().max()
    assert not close(ours, sample(fixture, model, steps=4), 1e-3)


def test_regions_on_image_tokens(dit):
    """Inside LoRA A's mask the prediction is A's, outside every mask the unmasked LoRA's."""
    fixture, model = dit
    a, b = list(fixture.loras)[:2]
    mask = torch.zeros(1, PIXELS, PIXELS)
    mask[..., :PIXELS // 2] = 1.0  # the left half of the image
    st = stack({"lora_name": file(a), "strength_model": 1.0, "mask": mask, "mask_feather": 0}, (file(b), 1.0))
    outer = CallRecorder()
    sample(fixture, apply(outer.attach(model), st, "regions"), steps=1)
    (call,) = outer.calls
    half = latent_shape(fixture, model)[-1] // 2
    inside = call_out(lora_loader(model, (file(a), 1.0)), call)
    outside = call_out(lora_loader(model, (file(b), 1.0)), call)
    out = call["out"]
    assert close(out[..., :half], inside[..., :half])
    assert close(out[..., half:], outside[..., half:])
    assert not close(inside, outside, 1e-2)


@pytest.fixture(scope="module")
def other_loras(models_dir):
    """{base model: LoRA file}: a Flux.1 and a Qwen-Image LoRA in the kohya layout (two layers each,
    at their models' widths), to put on the wrong model."""
    files = {"Flux": ("test_other_flux1_kohya.safetensors", {
                 "lora_unet_double_blocks_0_img_attn_qkv": (9216, 3072), "lora_unet_single_blocks_0_linear2": (3072, 15360)}),
             "Qwen-Image": ("test_other_qwen_image_kohya.safetensors", {
                 "lora_unet_transformer_blocks_0_attn_to_q": (3072, 3072),
                 "lora_unet_transformer_blocks_0_img_mlp_net_0_proj": (12288, 3072)})}
    for seed, (name, named) in enumerate(files.values()):
        fx.write_lora(models_dir / "loras" / name, None, None, fmt="kohya", seed=90 + seed, named=named)
    return {base: name for base, (name, _) in files.items()}


def test_a_lora_for_another_model_names_the_file_and_its_base(dit, other_loras):
    """An SD1.5 LoRA matches none of the keys; a Flux.1 LoRA none of Z-Image's or Qwen-Image's, and
    Flux.2's layer names but not their widths; a Qwen-Image LoRA none of Flux.1's. Each error names
    the file and the model it is for."""
    fixture, model = dit
    other = "Qwen-Image" if fixture.key.startswith("flux1") else "Flux"
    for lora, base in [("test_kohya.safetensors", "SD1"), (other_loras[other], other)]:
        with pytest.raises(CMLoRAError) as e:
            apply(model, stack((lora, 1.0)), "composite")
        assert lora in str(e.value) and f"looks like a {base}" in str(e.value)


def test_cmlora_runs_with_the_prediction_cache_and_refuses_the_deep_one(dit):
    from comfyui_cmlora.nodes.apply_nodes import ApplyNode
    from comfyui_cmlora.nodes.cmlora_nodes import SchedulerNode

    fixture, model = dit
    st = stack(*[(file(s), 1.0) for s in list(fixture.loras)[:2]])

    def scheduled(cache):
        sched = SchedulerNode.execute(
            stack=st, mode="offline", switch_interval=1, cache=cache, refresh="uniform", refresh_interval=2,
            h_to_l_fraction=0.5, online_threshold=0.5, w_dom="constant", dominant_full=True, preview_steps=8).args[0]
        return ApplyNode.execute(model=model, stack=st, method="cmlora", switch_interval=1, schedule=sched).args[0]

    out = sample(fixture, scheduled("prediction"), steps=3)
    assert torch.isfinite(out).all()
    with pytest.raises(CMLoRAError) as e:
        sample(fixture, scheduled("deep"), steps=2)
    assert "needs a UNet" in str(e.value) and "cache" in str(e.value)


def test_clora_refuses_the_model_before_encoding_anything(dit, sd15):
    """(Any CLIP passes the input check; SD1.5's is at hand. The model is refused before it is used.)"""
    from comfyui_cmlora.nodes.clora_nodes import AttentionMasker

    fixture, model = dit
    st = stack({"lora_name": file(next(iter(fixture.loras))), "strength_model": 1.0, "category": "character",
                "concept": "cat"})
    with pytest.raises(CMLoRAError) as e:
        AttentionMasker.execute(model=model, clip=sd15[1], stack=st, prompt="a cat", temperature=0.5, step_size=20.0,
                                stop_fraction=0.5, extra_iterations=0, mask_threshold=0.4, attention="conditional",
                                style_scope="global")
    assert "regions" in str(e.value)
