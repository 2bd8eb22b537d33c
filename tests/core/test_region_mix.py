"""Region weights and the per-pixel mix of the copies' predictions (no host)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cmlora_core.regions import MaskShapeError, combine_regions, grid_size, latent_mask, region_weights


def test_weights_sum_to_one_and_overlaps_share_in_proportion():
    left = torch.zeros(16, 16)
    left[:, :8] = 1.0
    middle = torch.zeros(16, 16)
    middle[:, 4:12] = 1.0
    w = region_weights([latent_mask(left, 0, (4, 4)), latent_mask(middle, 0, (4, 4))], (4, 4))
    assert w.shape == (3, 4, 4)
    assert torch.allclose(w.sum(0), torch.ones(4, 4))
    assert torch.equal(w[:, 0, 0], torch.tensor([0.0, 1.0, 0.0]))   # left only
    assert torch.equal(w[:, 0, 1], torch.tensor([0.0, 0.5, 0.5]))   # both masks: shared
    assert torch.equal(w[:, 0, 3], torch.tensor([1.0, 0.0, 0.0]))   # no mask: copy 0


@pytest.mark.parametrize("frames", [None, 1, 3])
def test_each_pixel_takes_its_regions_copy_for_image_and_video_latents(frames):
    """A UNet's (B, C, h, w) latent and a video VAE's (B, C, T, h, w) one (Qwen-Image's, T=1)."""
    batch, copies = 2, 3
    spatial = (batch, 4, *(() if frames is None else (frames,)), 4, 4)
    outputs = torch.randn(copies * batch, *spatial[1:])
    weights = torch.zeros(copies, 4, 4)
    weights[0, :, :2] = 1.0
    weights[1, :, 2] = 1.0
    weights[2, :, 3] = 1.0
    mixed = combine_regions(outputs, weights)
    assert mixed.shape == spatial
    per_copy = outputs.reshape(copies, *spatial)
    assert torch.equal(mixed[..., :2], per_copy[0][..., :2])
    assert torch.equal(mixed[..., 2], per_copy[1][..., 2])
    assert torch.equal(mixed[..., 3], per_copy[2][..., 3])


def test_the_feather_is_a_band_of_that_many_pixels_centred_on_the_edge():
    mask = torch.zeros(64, 64)
    mask[:, :32] = 1.0  # columns 0-31
    w = latent_mask(mask, 16, (64, 64))[20].numpy()  # a latent as large as the mask: one row, by column
    # by hand: a 17-wide box over the edge between columns 31 and 32 covers (40 - x) inside pixels at x
    x = np.arange(64)
    assert np.allclose(w, np.clip((40 - x) / 17, 0, 1), atol=1e-6)
    assert (w[:24] == 1).all() and (w[40:] == 0).all() and ((w > 0) & (w < 1)).sum() == 16
    # a 32-pixel stripe at the default feather 16 reaches weight 1 in its middle
    stripe = torch.zeros(64, 64)
    stripe[:, 16:48] = 1.0
    assert float(latent_mask(stripe, 16, (64, 64))[0, 31]) == 1.0
    # feather 0: the mask shrunk by area, nothing else
    assert torch.equal(latent_mask(mask, 0, (8, 8))[0], torch.tensor([1.0] * 4 + [0.0] * 4))


def test_a_large_mask_is_feathered_on_a_grid_of_the_latents_size():
    latent = (8, 12)
    mask = torch.zeros(4096, 6144)
    mask[1000:3000, 1500:5000] = 1.0
    assert grid_size(tuple(mask.shape), latent) == (64, 96)  # 8 cells per latent pixel, not 512
    # the expectation by numpy: the mask averaged over 64x64 blocks onto the grid, a box blur of
    # radius 8 cells (a 1024-pixel band is 16 grid cells), then averaged over 8x8 blocks
    grid = mask.numpy().reshape(64, 64, 96, 64).mean(axis=(1, 3))
    padded = np.pad(grid, 8, mode="edge")
    kernel = np.ones(17) / 17
    rows = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="valid"), 1, padded)
    blurred = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="valid"), 0, rows)
    expected = blurred.reshape(8, 8, 12, 8).mean(axis=(1, 3))
    assert np.allclose(latent_mask(mask, 1024, latent).numpy(), expected, atol=1e-5)


def test_a_mask_of_another_aspect_ratio_is_refused():
    with pytest.raises(MaskShapeError, match="64x64 pixels, the image 512x768"):
        latent_mask(torch.ones(64, 64), 0, (96, 64))
    assert latent_mask(torch.ones(96, 64), 0, (96, 64)).shape == (96, 64)  # same shape, any size
