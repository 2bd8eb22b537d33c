"""Region weights and the per-pixel mix of the copies' predictions (no host)."""
from __future__ import annotations

import pytest
import torch

from cmlora_core.regions import combine_regions, region_weights


def test_weights_sum_to_one_and_overlaps_share_in_proportion():
    left = torch.zeros(16, 16)
    left[:, :8] = 1.0
    middle = torch.zeros(16, 16)
    middle[:, 4:12] = 1.0
    w = region_weights([left, middle], (4, 4))
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
