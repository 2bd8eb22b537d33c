"""The DiTs artists compose LoRAs on — Flux.1 [dev] and [schnell], Flux.2, Z-Image, Qwen-Image — on the
real host: every fixture of make_fixtures.DIT_FIXTURES, each with two models.

* The full-width file (one block of each kind, at the widths the host's detection needs) through the
  host's UNETLoader with weight_dtype fp8_e4m3fn, as artists load large DiTs (a quarter of the memory
  of float32): the tests of the loader path — what the host detects, how every LoRA layout maps (slices
  of fused layers included), LoRAs for other models refused with their base named. Nothing samples it.
* The narrow twin: the same host model class and layer layout at a fraction of the width, built
  in-process (DiTFixture.narrow_patcher; no host detects such a width from a file), with LoRA files of
  the same layouts at its widths: the tests that compare the pack's sampling with the host's own
  LoraLoader — merge, switch, composite, step ranges, regions — and CMLoRA's and CLoRA's limits.

A fixture the running host cannot load is skipped with the reason (a host without the model, or whose
detection reads the fixture's keys as another configuration: the host of late 2025 fixes Flux.2 at 48
heads, the 32-billion-parameter width, which a CPU test cannot hold).

The text encoders of these models (T5-XXL and CLIP-L, Mistral-3 24B, Qwen3-4B, Qwen2.5-VL 7B) cannot
run on the CPU here, so the conditioning is built in-process: hidden states of the encoder's width (the
twin's narrower one), with what the model's text-encode node adds (Flux.1's pooled CLIP-L vector, the
guidance value of Flux.1 [dev] and Flux.2).

The models are module-scoped (pytest groups the tests by fixture) and marked large_model, so they run
before the session-scoped SD1.5 and SDXL models of the other host tests are loaded.
"""
from __future__ import annotations

import gc

import pytest
import torch

import comfy.model_management
import comfy.patcher_extension
import make_fixtures as fx

from _util import CallRecorder, TorchFlops, apply, call_out, calls_out, lora_loader, stack, stepwise_reference, weight_digests

from comfyui_cmlora.cmlora_core.errors import CMLoRAError
from comfyui_cmlora.nodes.loras import map_model_lora
from comfyui_cmlora.nodes.runtime import runtime_of

pytestmark = pytest.mark.large_model
PIXELS = 64


@pytest.fixture(scope="module", params=sorted(fx.DIT_FIXTURES))
def fixture(request, models_dir):
    fixture = fx.DIT_FIXTURES[request.param]
    reason = fixture.unsupported()
    if reason:
        pytest.skip(reason)
    return fixture


@pytest.fixture(scope="module")
def full(fixture, models_dir):
    """The full-width file through the host's UNETLoader (fp8 weights); freed before the next fixture's."""
    fx.ensure_dit_model(models_dir, fixture.key)
    model = fx.load_unet(fixture.file, "fp8_e4m3fn")
    yield model
    del model
    gc.collect()


@pytest.fixture(scope="module")
def narrow(fixture, models_dir):
    """The narrow twin (float32, in-process) and its LoRA files; the host's loaded clones of it go with it."""
    fx.ensure_dit_narrow_loras(models_dir, fixture.key)
    model = fixture.narrow_patcher()
    yield model
    comfy.model_management.unload_all_models()
    del model
    gc.collect()


def full_file(stem: str) -> str:
    return f"test_{stem}.safetensors"


def conds(fixture):
    """The narrow twin's conditioning (hidden states of its narrow text width)."""
    context_dim, pooled_dim = fixture.narrow_text
    g = torch.Generator().manual_seed(5)

    def cond(scale):
        extra = dict(fixture.cond_extra)
        if pooled_dim:
            extra["pooled_output"] = torch.randn(1, pooled_dim, generator=g)
        return [[torch.randn(1, 6, context_dim, generator=g) * scale, extra]]

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
    """Equal up to float32 summation order, scaled to the outputs' size."""
    return torch.allclose(a, b, atol=tol * max(1.0, float(b.abs().max())), rtol=0)


def patched_keys(*refs) -> set[str]:
    """The weights the host's LoraLoader clones patch (the keys of their patch lists)."""
    return {k if isinstance(k, str) else k[0] for r in refs for k in r.patches}


# ---------------------------------------------------------------- the loader path, full width

def test_fixture_is_the_model_the_host_detects(fixture, full):
    assert type(full.model.model_config).__name__ == fixture.host_class
    config = full.model.model_config.unet_config
    assert config["image_model"] == fixture.config["image_model"]
    # every setting this host's detection gives is the fixture's (an older host lacks some)
    assert all(config[k] == v for k, v in fixture.config.items() if k in config)


def test_every_layout_maps_all_its_keys_as_the_host_does(fixture, full):
    """Each layout maps every key, onto the weights and slices the host's LoraLoader patches; the
    layouts that patch slices of fused layers patch exactly the fixture's list of them."""
    for stem in fixture.loras:
        mapped = map_model_lora(full, stack((full_file(stem), 1.0)).entries[0], "test")
        assert mapped.unmapped == [] and mapped.n_mapped > 0, stem
        ref = lora_loader(full, (full_file(stem), 1.0))
        host_keys = {(k, p[3]) for k, patches in ref.patches.items() for p in patches}
        ours = {(k, None) if isinstance(k, str) else (k[0], k[1]) for k in mapped.patches}
        assert ours == host_keys, stem
        sliced = {k[0] for k in mapped.patches if not isinstance(k, str)}
        assert sliced == {f"diffusion_model.{w}.weight" for w in fixture.sliced.get(stem, ())}, stem


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


def test_a_lora_for_another_model_names_the_file_the_model_and_its_base(fixture, full, other_loras):
    """An SD1.5 LoRA matches none of the keys; a Flux.1 LoRA none of Z-Image's or Qwen-Image's, and
    Flux.2's layer names but not their widths; a Qwen-Image LoRA none of Flux.1's. Each error names
    the file, the model it was put on and the model it is for."""
    other = "Qwen-Image" if fixture.key.startswith("flux1") else "Flux"
    for lora, base in [("test_kohya.safetensors", "SD1"), (other_loras[other], other)]:
        with pytest.raises(CMLoRAError) as e:
            apply(full, stack((lora, 1.0)), "composite")
        assert lora in str(e.value) and f"looks like a {base}" in str(e.value)
        assert fixture.host_class in str(e.value)


def test_a_flux_lora_on_an_sdxl_model_names_its_base(sdxl, other_loras):
    with pytest.raises(CMLoRAError) as e:
        apply(sdxl, stack((other_loras["Flux"], 1.0)), "composite")
    assert other_loras["Flux"] in str(e.value) and "looks like a Flux LoRA" in str(e.value)


def test_a_slice_of_a_fused_layer_of_the_wrong_width_is_refused(fixture, narrow, models_dir):
    """Diffusers-layout q projections 8 rows wider than the q third of Flux's fused qkv (and linear1):
    every method refuses the file before sampling, naming the slice."""
    if fixture.key != "flux1_dev":
        pytest.skip("one fused-slice layout is enough: Flux.1 [dev]'s diffusers file")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(models_dir / "loras" / fixture.narrow_file("flux_diffusers")))
    for k in [k for k in tensors if ".attn.to_q.lora_B." in k]:
        tensors[k] = torch.cat([tensors[k], tensors[k][:8]])
    name = "test_flux_wrong_slice_narrow.safetensors"
    save_file(tensors, str(models_dir / "loras" / name))
    for method in ("merge", "composite"):
        with pytest.raises(CMLoRAError) as e:
            apply(narrow, stack((name, 1.0)), method)
        text = str(e.value)
        assert name in text and "wrong shape" in text and "qkv.weight[0:" in text, text


# ---------------------------------------------------------------- sampling, on the narrow twin

def test_merge_equals_chained_lora_loader_model_only(fixture, narrow):
    specs = [(fixture.narrow_file(s), w) for s, w in zip(fixture.loras, (0.8, 0.6))]
    ours = sample(fixture, apply(narrow, stack(*specs), "merge"))
    ref = sample(fixture, lora_loader(narrow, *specs))
    assert torch.equal(ours, ref)


def test_switch_with_one_lora_equals_lora_loader_at_every_step(fixture, narrow):
    """One layout of each format that patches slices of fused layers (or the first layout, where none
    does): each step's prediction equals LoraLoader's bit for bit, and the weights it patched are
    bit-identical afterwards."""
    by_format = {}
    for stem, (fmt, _, _) in fixture.loras.items():
        if stem in fixture.sliced:
            by_format.setdefault(fmt, stem)
    for stem in by_format.values() or [next(iter(fixture.loras))]:
        name = fixture.narrow_file(stem)
        ref_model = lora_loader(narrow, (name, 0.9))
        before = weight_digests(narrow, patched_keys(ref_model))
        seen, ref_seen = [], []
        ours = sample(fixture, apply(narrow, stack((name, 0.9)), "switch", interval=1), steps=3,
                      callback=lambda i, x0, x, n, out=seen: out.append(x0.clone()))
        ref = sample(fixture, ref_model, steps=3, callback=lambda i, x0, x, n, out=ref_seen: out.append(x0.clone()))
        assert len(seen) == 3 and all(torch.equal(a, b) for a, b in zip(seen, ref_seen)), stem
        assert torch.equal(ours, ref), stem
        assert weight_digests(narrow, patched_keys(ref_model)) == before, stem


def test_composite_is_the_mean_of_lora_loader_predictions_in_one_call_per_chunk(fixture, narrow):
    """... and Compare Methods' FLOP figure for the run (its full pass counted on the meta device for the
    run's inputs, the routed products tallied) is what torch counts running it, over the base model's."""
    from comfyui_cmlora.nodes.compare_nodes import RowCounter, count_products, flop_ratio

    names = [fixture.narrow_file(s) for s in fixture.loras]
    refs = [lora_loader(narrow, (n, 1.0)) for n in names]
    before = weight_digests(narrow, patched_keys(*refs))
    outer, rows, flops, base_flops = CallRecorder(), RowCounter(), TorchFlops(), TorchFlops()
    counted = flops.attach(outer.attach(narrow))
    counted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test-rows", rows)
    patched = apply(counted, stack(*[(n, 1.0) for n in names]), "composite")
    count_products(patched)
    sample(fixture, patched, steps=2, cfg=2.0)  # cond and uncond: one host chunk of two rows
    sample(fixture, base_flops.attach(narrow), steps=2, cfg=2.0)
    assert flop_ratio(patched, rows) == pytest.approx(flops.total / base_flops.total, rel=1e-3)
    assert len(outer.calls) == 2 and all(c["x"].shape[0] == 2 for c in outer.calls)
    assert runtime_of(patched).last_trace.call_rows == [2 * len(names)] * 2
    per_ref = [calls_out(r, outer.calls) for r in refs]  # each reference patched once
    for k, call in enumerate(outer.calls):
        expected = sum(outs[k] for outs in per_ref) / len(refs)
        assert close(call["out"], expected), (call["out"] - expected).abs().max()
    assert weight_digests(narrow, patched_keys(*refs)) == before


def test_step_range_on_the_first_half_equals_lora_loader_then_the_base_model(fixture, narrow):
    """Merge and composite, against one step-by-step reference from the host's own nodes."""
    name = fixture.narrow_file(next(iter(fixture.loras)))
    lora = lora_loader(narrow, (name, 1.0))
    expected = stepwise_reference([lora, lora, narrow, narrow], conds(fixture), "euler", 4, seed=3, cfg=1.0,
                                  scheduler="simple", latent_shape=latent_shape(fixture, narrow))
    assert not close(expected, sample(fixture, lora, steps=4), 1e-3)
    assert not close(expected, sample(fixture, narrow, steps=4), 1e-3)
    for method in ("merge", "composite"):
        spec = {"lora_name": name, "strength_model": 1.0, "end_at": 0.5}
        ours = sample(fixture, apply(narrow, stack(spec), method), steps=4)
        assert close(ours, expected, 1e-4), (method, (ours - expected).abs().max())


def test_regions_on_image_tokens(fixture, narrow):
    """Inside LoRA A's mask the prediction is A's, outside every mask the unmasked LoRA's."""
    a, b = [fixture.narrow_file(s) for s in list(fixture.loras)[:2]]
    mask = torch.zeros(1, PIXELS, PIXELS)
    mask[..., :PIXELS // 2] = 1.0  # the left half of the image
    st = stack({"lora_name": a, "strength_model": 1.0, "mask": mask, "mask_feather": 0}, (b, 1.0))
    outer = CallRecorder()
    sample(fixture, apply(outer.attach(narrow), st, "regions"), steps=1)
    (call,) = outer.calls
    half = latent_shape(fixture, narrow)[-1] // 2
    inside = call_out(lora_loader(narrow, (a, 1.0)), call)
    outside = call_out(lora_loader(narrow, (b, 1.0)), call)
    out = call["out"]
    assert close(out[..., :half], inside[..., :half])
    assert close(out[..., half:], outside[..., half:])
    assert not close(inside, outside, 1e-2)


def test_cmlora_runs_with_the_prediction_cache_and_refuses_the_deep_one(fixture, narrow):
    from comfyui_cmlora.nodes.apply_nodes import ApplyNode
    from comfyui_cmlora.nodes.cmlora_nodes import SchedulerNode

    st = stack(*[(fixture.narrow_file(s), 1.0) for s in list(fixture.loras)[:2]])

    def scheduled(cache):
        sched = SchedulerNode.execute(
            stack=st, mode="offline", switch_interval=1, cache=cache, refresh="uniform", refresh_interval=2,
            h_to_l_fraction=0.5, online_threshold=0.5, w_dom="constant", dominant_full=True, preview_steps=8).args[0]
        return ApplyNode.execute(model=narrow, stack=st, method="cmlora", switch_interval=1, schedule=sched).args[0]

    out = sample(fixture, scheduled("prediction"), steps=3)
    assert torch.isfinite(out).all()
    with pytest.raises(CMLoRAError) as e:
        sample(fixture, scheduled("deep"), steps=2)
    message = str(e.value)
    assert "needs a UNet" in message and "cache" in message
    assert type(narrow.model.diffusion_model).__name__ in message


def test_clora_refuses_the_model_before_encoding_anything(fixture, narrow, sd15):
    """(Any CLIP passes the input check; SD1.5's is at hand. The model is refused before it is used.)"""
    from comfyui_cmlora.nodes.clora_nodes import AttentionMasker

    st = stack({"lora_name": fixture.narrow_file(next(iter(fixture.loras))), "strength_model": 1.0,
                "category": "character", "concept": "cat"})
    with pytest.raises(CMLoRAError) as e:
        AttentionMasker.execute(model=narrow, clip=sd15[1], stack=st, prompt="a cat", temperature=0.5, step_size=20.0,
                                stop_fraction=0.5, extra_iterations=0, mask_threshold=0.4, attention="conditional",
                                style_scope="global")
    assert "regions" in str(e.value) and type(narrow.model.diffusion_model).__name__ in str(e.value)
