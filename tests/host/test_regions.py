"""Regional LoRAs (method "regions") on the real host: inside a LoRA's mask the prediction is that
LoRA's (the host's LoraLoader model on the same call), outside every mask the base model's or the
unmasked LoRAs', and a feathered edge blends the two by the feathered mask."""
from __future__ import annotations

import pytest
import torch

from _util import Recorder, apply, diffusion_out, ksample, lora_loader, stack

from comfyui_cmlora.cmlora_core.errors import CMLoRAError
from comfyui_cmlora.cmlora_core.regions import feather, to_latent
from comfyui_cmlora.nodes.runtime import runtime_of

A, B, C = "test_kohya.safetensors", "test_locon.safetensors", "test_peft.safetensors"
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
def test_inside_the_mask_the_loras_prediction_outside_the_rest(sd15, conds, others):
    model = sd15[0]
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


def test_feathered_edge_blends_by_the_feathered_mask(sd15, conds):
    model = sd15[0]
    st = stack({"lora_name": A, "strength_model": 1.0, "mask": left_half(), "mask_feather": 8}, (B, 0.8))
    _, calls = recorded_run(model, st, conds, steps=1)
    w = to_latent(feather(left_half()[0], 8), (8, 8))  # the weight of A's prediction per latent pixel
    assert torch.all(w[:, :2] == 1) and torch.all(w[:, 6:] == 0)
    band = (w > 0) & (w < 1)
    assert band[:, 2:6].all()  # the feathered band spans the middle columns
    inside, outside = lora_loader(model, (A, 1.0)), lora_loader(model, (B, 0.8))
    for call in calls:
        a, rest = diffusion_out(inside, call), diffusion_out(outside, call)
        expected = w * a + (1 - w) * rest
        assert torch.allclose(call["out"], expected, atol=1e-4), (call["out"] - expected).abs().max()
        mid = call["out"][..., 3]
        assert not torch.allclose(mid, a[..., 3], atol=1e-3) and not torch.allclose(mid, rest[..., 3], atol=1e-3)


def test_overlapping_masks_share_the_pixel(sd15, conds):
    model = sd15[0]
    full = torch.ones(1, SIZE, SIZE)
    st = stack({"lora_name": A, "mask": full, "mask_feather": 0}, {"lora_name": C, "mask": left_half(), "mask_feather": 0})
    _, calls = recorded_run(model, st, conds, steps=1)
    a, c = lora_loader(model, (A, 1.0)), lora_loader(model, (C, 1.0))
    for call in calls:
        pa, pc = diffusion_out(a, call), diffusion_out(c, call)
        assert torch.allclose(call["out"][..., :4], (0.5 * pa + 0.5 * pc)[..., :4], atol=1e-4)
        assert torch.allclose(call["out"][..., 4:], pa[..., 4:], atol=1e-4)


def test_masks_need_method_regions_and_regions_need_masks(sd15):
    model = sd15[0]
    masked = stack({"lora_name": A, "mask": left_half()}, (B, 1.0))
    for method in ("merge", "composite", "switch"):
        with pytest.raises(CMLoRAError) as e:
            apply(model, masked, method)
        assert "CMLoRA Apply" in str(e.value) and "'regions'" in str(e.value) and A in str(e.value)
    with pytest.raises(CMLoRAError) as e:
        apply(model, stack((A, 1.0), (B, 1.0)), "regions")
    assert "needs at least one LoRA with a mask" in str(e.value)
    for bad, words in ((torch.zeros(1, 8, 8), "empty"), (torch.ones(2, 8, 8), "one mask"),
                       (torch.full((1, 8, 8), 2.0), "outside 0..1")):
        with pytest.raises(CMLoRAError) as e:
            stack({"lora_name": A, "mask": bad})
        assert "'mask'" in str(e.value) and words in str(e.value)


def test_regions_leave_the_base_model_as_it_was(sd15, conds):
    model = sd15[0]
    before = ksample(model, conds)
    recorded_run(model, stack({"lora_name": A, "mask": left_half()}, (B, 0.8)), conds)
    assert torch.equal(ksample(model, conds), before)
