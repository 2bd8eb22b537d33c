"""CLoRA with the artist's masks: replace, add to or limit the masks found from attention; masks saved
and loaded to keep a layout across runs; bad masks refused naming the node, the input and the fix."""
from __future__ import annotations

import comfy.sample
import folder_paths
import pytest
import torch
from test_clora import masker, negative

from _util import ksample

from comfyui_cmlora.cmlora_core.errors import CMLoRAError
from comfyui_cmlora.nodes.clora_nodes import LoadMasks, MaskOutput, SaveMasks
from comfyui_cmlora.nodes.runtime import runtime_of

SIZE = 64  # the test latent is 8x8: 64x64 pixels


def halves() -> torch.Tensor:
    """Cat on the left half, dog on the right: (2, 64, 64)."""
    m = torch.zeros(2, SIZE, SIZE)
    m[0, :, :SIZE // 2] = 1.0
    m[1, :, SIZE // 2:] = 1.0
    return m


def at_latent(masks: torch.Tensor) -> torch.Tensor:
    """(N, 64, 64) pixel masks -> (N, 1, 8, 8) latent masks, by 8x8 blocks at least half in."""
    return (torch.nn.functional.avg_pool2d(masks[:, None], 8) >= 0.5).float()


def run(models, steps=3, **kw):
    model, positive = masker(models, **kw)
    out = ksample(model, (positive, negative(models)), steps=steps, sampler="euler")
    assert torch.isfinite(out).all()
    return model, out, runtime_of(model).last_clora


def test_replace_uses_the_drawn_masks_at_every_step_and_in_the_masks_output(sd15_narrow):
    drawn = halves()
    drawn[:, :, 28:36] = 0.4  # a soft edge below one half: out of both masks
    model, out, trace = run(sd15_narrow, masks=drawn, mask_mode="replace")
    expected = at_latent(drawn)
    assert sorted(trace.masks) == [0, 1, 2]
    for step, masks in trace.masks.items():
        assert torch.equal(masks, expected), f"step {step}"
    # the fusion used them: every latent pixel in one subject's region, none in both
    assert torch.equal(expected.sum(0), torch.ones(1, 8, 8))
    masks, _ = MaskOutput.execute(model=model, samples={"samples": out}, step=-1).args
    assert torch.equal(masks, torch.nn.functional.interpolate(expected, size=(SIZE, SIZE), mode="nearest")[:, 0])


def test_add_and_limit_join_or_cut_the_masks_found_from_attention(sd15_narrow):
    """Step 0 holds the masks of the first model call, the same in the three runs (no latent updates):
    add is their union with the drawn ones, limit their intersection."""
    drawn = torch.zeros(2, SIZE, SIZE)
    drawn[0, :32, :32] = 1.0  # cat: the top-left quarter
    drawn[1, 48:, :] = 1.0  # dog: the bottom two latent rows
    # a high threshold: the found masks are the peak cells, not the whole (tiny) attention map
    found = run(sd15_narrow, step_size=0.0, mask_threshold=0.99)[2].masks[0]
    added = run(sd15_narrow, step_size=0.0, mask_threshold=0.99, masks=drawn, mask_mode="add")[2].masks[0]
    limited = run(sd15_narrow, step_size=0.0, mask_threshold=0.99, masks=drawn, mask_mode="limit")[2].masks[0]
    want = at_latent(drawn)
    assert torch.equal(added, torch.maximum(found, want))
    assert torch.equal(limited, found * want)
    assert not torch.equal(added, found) and not torch.equal(limited, found), "the drawn masks changed nothing"


def test_one_mask_per_subject_and_image_in_a_batch(sd15_narrow):
    lat = torch.zeros(2, 4, 8, 8)
    # CLoRA Masks' order: subject major, so cat image 0, cat image 1, dog image 0, dog image 1
    per_image = torch.stack([halves()[0], halves()[1], halves()[1], halves()[0]])
    model, positive = masker(sd15_narrow, extra_iterations=0, masks=per_image, mask_mode="replace")
    comfy.sample.sample(model, comfy.sample.prepare_noise(lat, 2), 2, 5.0, "euler", "normal", positive,
                        negative(sd15_narrow), lat, seed=2, disable_pbar=True)
    masks = runtime_of(model).last_clora.masks[0]  # (2 subjects, 2 images, 8, 8)
    left = at_latent(halves())[:, 0]
    assert torch.equal(masks[0, 0], left[0]) and torch.equal(masks[0, 1], left[1])
    assert torch.equal(masks[1, 0], left[1]) and torch.equal(masks[1, 1], left[0])


def test_saved_masks_load_back_and_keep_the_layout(sd15_narrow, tmp_path, monkeypatch):
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    model, out, _ = run(sd15_narrow)
    found, _ = MaskOutput.execute(model=model, samples={"samples": out}, step=-1).args
    text = SaveMasks.execute(masks=found, filename="two pets").ui.as_dict()["text"]
    assert (tmp_path / "clora_masks" / "two pets.safetensors").is_file() and "saved 2 masks of 64x64" in text[0]
    options = next(i for i in LoadMasks.define_schema().inputs if i.id == "masks_file").options
    assert "two pets.safetensors" in options  # listed for the combo (refresh in the editor)
    (loaded,) = LoadMasks.execute(masks_file="two pets.safetensors").args
    assert torch.equal(loaded, found)
    # the next run (another seed) keeps the layout
    _, _, trace = run(sd15_narrow, masks=loaded, mask_mode="replace")
    assert all(torch.equal(m, at_latent(found)) for m in trace.masks.values())


def _error(fn, **kw) -> str:
    with pytest.raises(CMLoRAError) as e:
        fn(**kw)
    return str(e.value)


def test_bad_masks_are_refused_and_leave_the_model_as_it_was(sd15_narrow, tmp_path, monkeypatch):
    msg = _error(masker, models=sd15_narrow, masks=torch.ones(3, SIZE, SIZE))
    assert "CLoRA Attention Masker" in msg and "'masks'" in msg and "3 mask(s)" in msg and "one mask per subject" in msg
    msg = _error(masker, models=sd15_narrow, masks=halves()[:1].expand(2, -1, -1) * torch.tensor([1.0, 0.0])[:, None, None])
    assert "'masks'" in msg and "dog is empty" in msg and "mask_mode 'add'" in msg
    msg = _error(masker, models=sd15_narrow, mask_mode="limit")
    assert "'mask_mode'" in msg and "not connected" in msg
    # a shape that fits no image of this run: refused when sampling, before any step
    model, positive = masker(sd15_narrow, masks=torch.ones(2, SIZE, 2 * SIZE))
    with pytest.raises(CMLoRAError, match=r"CLoRA Attention Masker.*'masks'.*128x64 pixels, the image 64x64"):
        ksample(model, (positive, negative(sd15_narrow)), steps=2)
    base = sd15_narrow[0]
    assert not base.object_patches and not base.patches, "the failed run left patches on the base model"
    ok, positive = masker(sd15_narrow)
    assert torch.isfinite(ksample(ok, (positive, negative(sd15_narrow)), steps=2)).all()
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    assert "not a plain file name" in _error(SaveMasks.execute, masks=halves(), filename="../outside")
    (tmp_path / "clora_masks").mkdir(exist_ok=True)
    (tmp_path / "clora_masks" / "broken.safetensors").write_bytes(b"not a safetensors file")
    msg = _error(LoadMasks.execute, masks_file="broken.safetensors")
    assert "'masks_file'" in msg and "CLoRA Save Masks" in msg


def test_empty_and_nan_masks_long_names_and_links_out_of_the_folder_are_refused(sd15_narrow, tmp_path, monkeypatch):
    """Zero-size masks (a crop past the image's edge), NaN masks, a file name over the file system's 255
    bytes, and a saved-masks file that is a link out of its folder: each a clear error naming the input."""
    from safetensors.torch import save_file

    nan = halves().clone()
    nan[0, 0, 0] = float("nan")
    for bad, words in ((torch.zeros(2, 0, SIZE), "no pixels"), (nan, "not numbers")):
        for mode in ("add", "replace"):
            msg = _error(masker, models=sd15_narrow, masks=bad, mask_mode=mode)
            assert "CLoRA Attention Masker" in msg and "'masks'" in msg and words in msg, msg
        msg = _error(SaveMasks.execute, masks=bad, filename="x")
        assert "CLoRA Save Masks" in msg and "'masks'" in msg and words in msg, msg
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    long = "é" * 100  # 100 letters of 2 bytes: 212 bytes with ".safetensors", within the limit
    SaveMasks.execute(masks=halves(), filename=long)
    longer = "日" * 90  # 90 letters of 3 bytes: 270 bytes
    msg = _error(SaveMasks.execute, masks=halves(), filename=longer)
    assert "'filename'" in msg and "270 bytes" in msg and "shorter name" in msg
    folder = tmp_path / "clora_masks"
    save_file({"masks": nan}, str(tmp_path / "nan.safetensors"))
    (folder / "outside.safetensors").symlink_to(tmp_path / "nan.safetensors")
    options = next(i for i in LoadMasks.define_schema().inputs if i.id == "masks_file").options
    assert "outside.safetensors" not in options and f"{long}.safetensors" in options
    assert "not one of its options" in _error(LoadMasks.execute, masks_file="outside.safetensors")
    save_file({"masks": nan}, str(folder / "nan inside.safetensors"))
    msg = _error(LoadMasks.execute, masks_file="nan inside.safetensors")
    assert "'masks_file'" in msg and "not numbers" in msg
