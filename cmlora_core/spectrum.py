"""Fourier profiling of images and latents (SPEC.md section 2, "Profiling").

The measure: grey image -> centred 2-D FFT -> log amplitude -> mean over rings of integer
radius -> divided by its maximum (the DC ring). A LoRA's high-frequency score is the mean
of that profile beyond a cutoff given as a fraction of the largest radius, so the same
setting works at any resolution and on latents.
"""
from __future__ import annotations

import torch


def radial_profile(image: torch.Tensor) -> torch.Tensor:
    """Normalised ring-averaged log-amplitude spectrum of one image.

    image: (C, H, W) or (H, W); channels are averaged to grey. Returns (R,) with
    R = min(H, W) // 2 + 1 rings (radius 0 .. largest radius that fits inside the image,
    so no ring is empty). Values are divided by the maximum ring (normally r = 0).
    """
    grey = image.float().mean(0) if image.ndim == 3 else image.float()
    h, w = grey.shape
    spec = torch.fft.fftshift(torch.fft.fft2(grey))
    logamp = torch.log(spec.abs() + 1e-8)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32) - h // 2,
                            torch.arange(w, dtype=torch.float32) - w // 2, indexing="ij")
    radius = torch.sqrt(yy * yy + xx * xx).round().long()
    rmax = min(h, w) // 2
    inside = radius <= rmax
    sums = torch.zeros(rmax + 1).index_add_(0, radius[inside], logamp[inside])
    counts = torch.zeros(rmax + 1).index_add_(0, radius[inside], torch.ones_like(logamp[inside]))
    profile = sums / counts
    peak = profile.abs().max()
    return profile / peak if peak > 0 else profile


def high_frequency_score(profile: torch.Tensor, cutoff: float = 0.2) -> float:
    """Mean of the profile over rings r >= cutoff * largest radius."""
    rmax = profile.numel() - 1
    start = max(1, int(round(cutoff * rmax)))
    return float(profile[start:].mean())


def image_score(image: torch.Tensor, cutoff: float = 0.2) -> float:
    """High-frequency score of one (C, H, W) image or latent; batches are averaged by the caller."""
    return high_frequency_score(radial_profile(image), cutoff)


def batch_score(images: torch.Tensor, cutoff: float = 0.2) -> float:
    """Mean score over a batch (B, C, H, W)."""
    return sum(image_score(im, cutoff) for im in images) / images.shape[0]
