"""Regional LoRAs (method "regions") on the real host: inside a LoRA's mask the prediction is that
LoRA's (the host's LoraLoader model on the same call), outside every mask the base model's or the
unmasked LoRAs', and a feathered edge blends the two by the feathered mask."""
from __future__ import annotations

import pytest
import torch

import comfy.sample

from _util import Recorder, apply, diffusion_out, ksample, lora_loader, stack

from comfyui_cmlora.cmlora_core.errors import CMLoRAError
from comfyui_cmlora.nodes.runtime import runtime_of

A, B, C = "test_kohya_narrow.safetensors", "test_locon_narrow.safetensors", "test_peft_narrow.safetensors"
SIZE = 64  # image pixels of the 8x8 latent


def left_half():
    m = torch.zeros(1, SIZE, SIZE)
    m[:, :, : SIZE // 2] = 1.0
    return m


def recorded_run(model, st, conds, steps=2):
    rec = Recorder()
    # the recorder's wrapper registered first is the outer one: it sees the call as the sampler makes it
    patched = apply(rec.attach(model), st, "regions")
    ksample(patched, conds, steps=steps)
    assert rec.calls
    return patched, rec.calls


@pytest.mark.parametrize("others", [[], [(B, 0.8)]])
def test_inside_the_mask_the_loras_prediction_outside_the_rest(sd15_narrow, conds, others):
    model = sd15_narrow[0]
    st = stack({"lora_name": A, "strength_model": 1.0, "mask": left_half(), "mask_feather": 0}, *others)
    patched, calls = recorded_run(model, st, conds)
    inside, outside = lora_loader(model, (A, 1.0)), lora_loader(model, *others) if others else model
    for call in calls:
        a, rest = diffusion_out(inside, call), diffusion_out(outside, call)
        out = call["out"]
        assert torch.allclose(out[..., :4], a[..., :4], atol=1e-4), (out[..., :4] - a[..., :4]).abs().max()
        assert torch.allclose(out[..., 4:], rest[..., 4:], atol=1e-4), (out[..., 4:] - rest[..., 4:]).abs().max()
        assert not torch.allclose(a, rest, atol=1e-3)  # the two sides really differ
    trace = runtime_of(patched).last_trace
    assert set(trace.call_rows) == {2 * len(calls[0]["x"])}  # one forward: the rest and A's region


def test_feathered_edge_blends_over_the_feather_band(sd15_narrow, conds):
    """The default feather, 16 pixels: a band from 8 pixels inside the edge (mask column 24) to 8 outside
    (column 40), where a 17-wide box over the edge covers 40 - x mask pixels at column x. Each latent
    column averages 8 of them: columns 0-2 are A's, 5-7 B's, 3 and 4 blend (12.5/17 and 4.5/17)."""
    model = sd15_narrow[0]
    st = stack({"lora_name": A, "strength_model": 1.0, "mask": left_half(), "mask_feather": 16}, (B, 0.8))
    _, calls = recorded_run(model, st, conds, steps=1)
    w = torch.tensor([1, 1, 1, 12.5 / 17, 4.5 / 17, 0, 0, 0])  # by hand, per latent column
    inside, outside = lora_loader(model, (A, 1.0)), lora_loader(model, (B, 0.8))
    for call in calls:
        a, rest = diffusion_out(inside, call), diffusion_out(outside, call)
        expected = w * a + (1 - w) * rest
        assert torch.allclose(call["out"], expected, atol=1e-4), (call["out"] - expected).abs().max()


def test_a_masked_lora_off_at_a_step_leaves_its_region_to_the_rest(sd15_narrow, conds):
    """A (masked) fades from 1 to 0 over two steps: at 0 on the second it is off, and the whole image is B's."""
    model = sd15_narrow[0]
    st = stack({"lora_name": A, "mask": left_half(), "mask_feather": 0, "strength_curve": "linear",
                "strength_model_end": 0.0}, (B, 0.8))
    patched, calls = recorded_run(model, st, conds, steps=2)
    rest = lora_loader(model, (B, 0.8))
    second = [c for c in calls if c["sigma"] < calls[0]["sigma"]]
    assert second
    for call in second:
        expected = diffusion_out(rest, call)
        assert torch.allclose(call["out"], expected, atol=1e-4), (call["out"] - expected).abs().max()
    assert runtime_of(patched).last_trace.call_rows[-1] == len(second[-1]["x"])  # one copy: no region left


def test_a_mask_of_another_shape_is_refused(sd15_narrow, conds):
    """A square mask on a 64x96 image would be stretched: refused naming the stack's mask input, before
    the model is called at all."""
    model = sd15_narrow[0]
    before = ksample(model, conds, steps=1)
    rec = Recorder()
    patched = apply(rec.attach(model), stack({"lora_name": A, "mask": left_half()}, (B, 0.8)), "regions")
    pos, neg = conds
    lat = torch.zeros(1, 4, 12, 8)
    with pytest.raises(CMLoRAError) as e:
        comfy.sample.sample(patched, comfy.sample.prepare_noise(lat, 1), 2, 5.0, "euler", "normal", pos, neg, lat,
                            seed=1, disable_pbar=True)
    assert "CMLoRA LoRA Stack" in str(e.value) and "'mask'" in str(e.value) and "64x64" in str(e.value)
    assert rec.calls == []  # refused when sampling starts, before any forward
    assert torch.equal(ksample(model, conds, steps=1), before)  # the failed run left the model as it was


def test_overlapping_masks_share_the_pixel(sd15_narrow, conds):
    model = sd15_narrow[0]
    full = torch.ones(1, SIZE, SIZE)
    st = stack({"lora_name": A, "mask": full, "mask_feather": 0}, {"lora_name": C, "mask": left_half(), "mask_feather": 0})
    _, calls = recorded_run(model, st, conds, steps=1)
    a, c = lora_loader(model, (A, 1.0)), lora_loader(model, (C, 1.0))
    for call in calls:
        pa, pc = diffusion_out(a, call), diffusion_out(c, call)
        assert torch.allclose(call["out"][..., :4], (0.5 * pa + 0.5 * pc)[..., :4], atol=1e-4)
        assert torch.allclose(call["out"][..., 4:], pa[..., 4:], atol=1e-4)


def test_masks_need_method_regions_and_regions_need_masks(sd15_narrow):
    model = sd15_narrow[0]
    masked = stack({"lora_name": A, "mask": left_half()}, (B, 1.0))
    for method in ("merge", "composite", "switch"):
        with pytest.raises(CMLoRAError) as e:
            apply(model, masked, method)
        assert "CMLoRA Apply" in str(e.value) and "'regions'" in str(e.value) and A in str(e.value)
    with pytest.raises(CMLoRAError) as e:
        apply(model, stack((A, 1.0), (B, 1.0)), "regions")
    assert "needs at least one LoRA with a mask" in str(e.value)
    for bad, words in ((torch.zeros(1, 8, 8), "empty"), (torch.ones(2, 8, 8), "one mask"),
                       (torch.full((1, 8, 8), 2.0), "outside 0..1"), (torch.zeros(1, 0, 8), "0x8"),
                       (torch.zeros(1, 8, 0), "8x0"), (torch.full((1, 8, 8), float("nan")), "outside 0..1")):
        with pytest.raises(CMLoRAError) as e:
            stack({"lora_name": A, "mask": bad})
        assert "'mask'" in str(e.value) and words in str(e.value)


def test_regions_leave_the_base_model_as_it_was(sd15_narrow, conds):
    model = sd15_narrow[0]
    before = ksample(model, conds)
    recorded_run(model, stack({"lora_name": A, "mask": left_half()}, (B, 0.8)), conds)
    assert torch.equal(ksample(model, conds), before)


@pytest.mark.parametrize("how", ["set area", "set mask bounds"])
def test_regions_under_an_area_prompt_lie_where_they_were_drawn(sd15_narrow, conds, how):
    """The prompt on the left half of a 128-pixel image (Conditioning (Set Area), or Set Mask with 'mask
    bounds'; the host makes such an area at least 8 latent cells wide): the host feeds the model that half
    alone. A's mask is the right half, so on that crop the prediction is the base model's; on the
    full-image call (the negative prompt) A's is on the right half only."""
    import nodes as host_nodes

    model = sd15_narrow[0]
    pos, neg = conds
    left = torch.zeros(1, 128, 128)
    left[..., :64] = 1.0
    if how == "set area":
        pos = host_nodes.ConditioningSetArea().append(pos, 64, 128, 0, 0, 1.0)[0]
    else:
        pos = host_nodes.ConditioningSetMask().append(pos, left, "mask bounds", 1.0)[0]
    rec = Recorder()
    patched = apply(rec.attach(model), stack({"lora_name": A, "mask": 1.0 - left, "mask_feather": 0}), "regions")
    lat = torch.zeros(1, 4, 16, 16)
    comfy.sample.sample(patched, comfy.sample.prepare_noise(lat, 1), 1, 5.0, "euler", "normal", pos, neg, lat,
                        seed=1, disable_pbar=True)
    a = lora_loader(model, (A, 1.0))
    crops = 0
    for call in rec.calls:
        base_out, a_out, out = diffusion_out(model, call), diffusion_out(a, call), call["out"]
        if call["x"].shape[-1] == 8:  # the left half: outside A's mask
            crops += 1
            assert torch.allclose(out, base_out, atol=1e-4), (out - base_out).abs().max()
        else:
            assert torch.allclose(out[..., :8], base_out[..., :8], atol=1e-4)
            assert torch.allclose(out[..., 8:], a_out[..., 8:], atol=1e-4)
    assert crops == 1
