"""Regional LoRAs: each masked LoRA predicts inside its mask, the rest of the image gets the others.

The prediction of one model call is a per-pixel weighted sum of K+1 predictions made in one
forward: copy 0 with the LoRAs that have no mask (or none: the base model), copy k with the
k-th masked LoRA alone. The weights come from the masks, feathered and shrunk to the latent
(``latent_mask``). Where masks overlap they share the pixel in proportion; what the masks leave
uncovered goes to copy 0.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# A mask is feathered on a grid of at most this many cells per latent pixel and side (8: the image's
# own pixels for the host's 8x VAEs), so the cost follows the latent, not the mask's size.
GRID = 8


class MaskShapeError(ValueError):
    """A mask whose aspect ratio is not the image's: placed on the latent it would be stretched."""


def check_aspect(mask_hw: tuple[int, int], latent_hw: tuple[int, int]) -> None:
    """Refuse a mask whose aspect ratio differs from the latent's by more than 2%."""
    (mh, mw), (h, w) = mask_hw, latent_hw
    if abs(mh * w - mw * h) > 0.02 * mh * w:
        raise MaskShapeError(f"the mask is {mw}x{mh} pixels, the image {w * 8}x{h * 8}: their shapes differ, so "
                             "the region would be stretched off the place it was drawn")


def grid_size(mask_hw: tuple[int, int], latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The grid a mask is feathered on: the latent times k, k the mask's pixels per latent pixel
    (rounded up, at least 1, at most GRID)."""
    k = max(1, min(GRID, math.ceil(mask_hw[0] / latent_hw[0])))
    return latent_hw[0] * k, latent_hw[1] * k


def _resize(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, 1, H, W) to ``size``: the mean over each cell's pixels when shrinking, bilinear when growing."""
    if m.shape[-2] >= size[0] and m.shape[-1] >= size[1]:
        return F.interpolate(m, size=size, mode="area")
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False)


def box_blur(m: torch.Tensor, r: int) -> torch.Tensor:
    """(1, 1, H, W) blurred by a (2r+1)-wide box along each axis, edges extended; by running sums,
    so the cost does not grow with r. On a straight edge this is a linear ramp over 2r pixels:
    1 from r pixels inside on, 0 from r pixels outside on."""
    if r <= 0:
        return m
    out = m.double()
    for dim in (-1, -2):
        n = out.shape[dim]
        pad = (r, r, 0, 0) if dim == -1 else (0, 0, r, r)
        padded = F.pad(out, pad, mode="replicate")
        sums = torch.cumsum(padded, dim)
        sums = torch.cat([torch.zeros_like(sums.narrow(dim, 0, 1)), sums], dim)
        out = (sums.narrow(dim, 2 * r + 1, n) - sums.narrow(dim, 0, n)) / (2 * r + 1)
    return out.to(m.dtype)


def latent_mask(mask: torch.Tensor, feather: float, latent_hw: tuple[int, int]) -> torch.Tensor:
    """A (H, W) mask in 0..1 as weights on a (h, w) latent, its edge softened over a band of ``feather``
    pixels of the mask centred on the edge: weight 1 from feather/2 pixels inside the edge on, 0 from
    feather/2 pixels outside it on, a linear ramp between (a box blur of width feather + 1).

    The blur runs on ``grid_size``'s grid (the mask shrunk by area, or grown, to at most GRID cells per
    latent pixel) with the band scaled to it, and the result is averaged onto the latent; feather 0
    shrinks the mask by area alone. Refuses (MaskShapeError) a mask of another aspect ratio."""
    check_aspect(tuple(mask.shape[-2:]), latent_hw)
    grid = grid_size(tuple(mask.shape[-2:]), latent_hw)
    m = _resize(mask[None, None].float(), grid)
    r = round(feather / 2 * grid[0] / mask.shape[-2])
    m = box_blur(m, r)
    return F.interpolate(m, size=latent_hw, mode="area")[0, 0].clamp(0, 1)


def region_weights(masks: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """(K+1, h, w) weights summing to 1 per pixel: index 0 for what no mask covers, index k for
    the k-th mask (at the latent's ``size``: latent_mask). A pixel covered by masks whose values sum
    above 1 is shared among them in proportion, with nothing left for index 0."""
    m = torch.stack([mask.float() for mask in masks]).clamp(0, 1)
    total = m.sum(0)
    m = m / total.clamp(min=1.0)
    rest = (1.0 - total).clamp(min=0.0)
    return torch.cat([rest[None], m])


def combine_regions(outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(K+1)*B rows of predictions (copy k: rows k*B..(k+1)*B) mixed per pixel with (K+1, h, w)
    ``weights`` (every row alike) or (K+1, B, h, w) (per row): (B, C, h, w), or (B, C, T, h, w) for
    a video VAE's latent (every frame alike)."""
    k = weights.shape[0]
    out = outputs.reshape(k, outputs.shape[0] // k, *outputs.shape[1:])
    if weights.ndim == 3:
        w = weights.to(out).reshape(k, *([1] * (out.ndim - 3)), *weights.shape[1:])
    else:
        w = weights.to(out).reshape(k, weights.shape[1], *([1] * (out.ndim - 4)), *weights.shape[2:])
    return (out * w).sum(0)
