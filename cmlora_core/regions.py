"""Regional LoRAs: each masked LoRA predicts inside its mask, the rest of the image gets the others.

The prediction of one model call is a per-pixel weighted sum of K+1 predictions made in one
forward: copy 0 with the LoRAs that have no mask (or none: the base model), copy k with the
k-th masked LoRA alone. The weights come from the masks, feathered (blurred) at the mask's
own resolution and resized to the latent. Where masks overlap they share the pixel in
proportion; what the masks leave uncovered goes to copy 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def feather(mask: torch.Tensor, radius: float) -> torch.Tensor:
    """A (H, W) mask in 0..1 with its edges softened over about ``radius`` pixels on each side:
    two passes of a (2r+1)-wide box blur (a close, cheap stand-in for a Gaussian), edges
    extended. radius 0 returns the mask unchanged."""
    r = int(round(radius))
    if r <= 0:
        return mask
    m = mask[None, None].float()
    for _ in range(2):
        m = F.avg_pool2d(F.pad(m, (r, r, 0, 0), mode="replicate"), (1, 2 * r + 1), stride=1)
        m = F.avg_pool2d(F.pad(m, (0, 0, r, r), mode="replicate"), (2 * r + 1, 1), stride=1)
    return m[0, 0].clamp(0, 1)


def to_latent(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A (H, W) mask at a (h, w) latent size: the mean over each latent cell's pixels when
    shrinking (area), bilinear when growing."""
    m = mask[None, None].float()
    if m.shape[-2] >= size[0] and m.shape[-1] >= size[1]:
        return F.interpolate(m, size=size, mode="area")[0, 0]
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False)[0, 0]


def region_weights(masks: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """(K+1, h, w) weights summing to 1 per pixel: index 0 for what no mask covers, index k for
    the k-th mask (already feathered, any resolution). A pixel covered by masks whose values sum
    above 1 is shared among them in proportion, with nothing left for index 0."""
    m = torch.stack([to_latent(mask, size) for mask in masks]).clamp(0, 1)
    total = m.sum(0)
    m = m / total.clamp(min=1.0)
    rest = (1.0 - total).clamp(min=0.0)
    return torch.cat([rest[None], m])


def combine_regions(outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(K+1)*B rows of predictions (copy k: rows k*B..(k+1)*B) mixed per pixel with (K+1, h, w)
    ``weights``: (B, C, h, w), or (B, C, T, h, w) for a video VAE's latent (every frame alike)."""
    k = weights.shape[0]
    out = outputs.reshape(k, outputs.shape[0] // k, *outputs.shape[1:])
    w = weights.to(out).reshape(k, *([1] * (out.ndim - 3)), *weights.shape[1:])
    return (out * w).sum(0)
