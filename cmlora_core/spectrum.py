"""Fourier profiling of images and latents.

The measure, as the reference notebook computes it: the image as 8-bit grey (decoded
images; latents are averaged over their channels as they are) -> centred 2-D FFT -> log
amplitude -> mean over rings of integer radius r = floor(distance to the centre), out to
the corners -> divided by its maximum (the DC ring). A high-frequency score is the mean of
that profile over r >= floor(cutoff * largest radius): at 512x512 the largest radius is
362 and the default cutoff 0.2 starts at r = 72, the reference's figure; being a fraction,
the same setting works at any resolution and on latents.
"""
from __future__ import annotations

import math

import torch


def grey_8bit(image: torch.Tensor) -> torch.Tensor:
    """A (3, H, W) RGB image in [0, 1] as the grey levels of its 8-bit file: ComfyUI's Save Image
    (255 * value, clipped, truncated to uint8), then ITU-R 601 luma in PIL's fixed-point
    arithmetic (what ``Image.convert("L")`` gives). Returns (H, W) float32 values 0..255."""
    rgb = (image.float() * 255.0).clamp(0, 255).to(torch.int64)  # truncation, as astype(uint8)
    r, g, b = rgb[0], rgb[1], rgb[2]
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.float32)


def radial_profile(grey: torch.Tensor) -> torch.Tensor:
    """Normalised ring-averaged log-amplitude spectrum of one (H, W) grey image.

    Ring r holds the frequencies at distance d from the centre (H//2, W//2) of the shifted
    spectrum with floor(d) = r, for r = 0 .. floor(distance to the farthest corner), so the
    corners count. Divided by the largest ring mean (normally r = 0).
    """
    h, w = grey.shape
    spec = torch.fft.fftshift(torch.fft.fft2(grey.double()))
    logamp = torch.log(spec.abs() + 1e-8)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64) - h // 2,
                            torch.arange(w, dtype=torch.float64) - w // 2, indexing="ij")
    radius = torch.sqrt(yy * yy + xx * xx).floor().long().flatten()
    n = int(radius.max()) + 1
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, radius, logamp.flatten())
    counts = torch.bincount(radius, minlength=n).to(torch.float64)
    profile = sums / counts.clamp_min(1)  # every ring up to the corner holds at least one frequency
    peak = profile.max()
    return (profile / peak if peak > 0 else profile).to(torch.float32)


def cutoff_ring(rings: int, cutoff: float) -> int:
    """First ring of the high-frequency band: floor(cutoff * largest radius) (72 at 512x512)."""
    return max(1, math.floor(cutoff * (rings - 1) + 1e-9))


def high_frequency_score(profile: torch.Tensor, cutoff: float = 0.2) -> float:
    """Mean of the profile over rings r >= floor(cutoff * largest radius)."""
    return float(profile[cutoff_ring(profile.numel(), cutoff):].double().mean())


def grey(image: torch.Tensor, decoded: bool) -> torch.Tensor:
    """What the measure reads: the 8-bit grey of a decoded RGB image, or a latent's channel mean."""
    if decoded:
        return grey_8bit(image)
    return image.float().mean(0) if image.ndim == 3 else image.float()


def image_score(image: torch.Tensor, cutoff: float = 0.2, decoded: bool = True) -> float:
    """High-frequency score of one (C, H, W) image (decoded, RGB in [0, 1]) or latent (decoded=False)."""
    return high_frequency_score(radial_profile(grey(image, decoded)), cutoff)


def batch_score(images: torch.Tensor, cutoff: float = 0.2, decoded: bool = False) -> float:
    """Mean score over a batch (B, C, H, W); latents by default (the online schedule reads predicted x0)."""
    return sum(image_score(im, cutoff, decoded) for im in images) / images.shape[0]
