"""Which LoRA does what at which step: step lookup from sigmas, Switch and Composite rules.

SPEC.md section 1. Steps are counted on the sigma schedule the sampler was given
(``transformer_options["sample_sigmas"]``), never by counting model calls, so samplers that
evaluate the model several times per step, or between schedule points, map every
evaluation to the step it belongs to.
"""
from __future__ import annotations

import torch


def step_index(sample_sigmas: torch.Tensor, sigma: torch.Tensor | float) -> int:
    """Index i of the step an evaluation at ``sigma`` belongs to, 0 <= i < T.

    ``sample_sigmas`` holds T+1 descending values (the last is usually 0). Step i runs from
    sample_sigmas[i] down to sample_sigmas[i+1]; an evaluation at sigma belongs to the last
    i with sample_sigmas[i] >= sigma, which also covers the intermediate sigmas of Heun or
    DPM++ 2S and the first point of a sliced (KSamplerAdvanced) schedule.
    """
    sig = float(sigma.reshape(-1)[0]) if torch.is_tensor(sigma) else float(sigma)
    points = sample_sigmas.reshape(-1)[:-1].detach().float().cpu()
    if points.numel() == 0:
        return 0
    # tolerance: sigmas pass through float32 conversions on the way to the model
    count = int((points >= sig * (1 - 1e-5) - 1e-8).sum())
    return max(0, min(points.numel() - 1, count - 1))


def num_steps(sample_sigmas: torch.Tensor) -> int:
    return max(1, sample_sigmas.reshape(-1).numel() - 1)


def switch_active(step: int, interval: int, n: int) -> int:
    """LoRA Switch: the LoRA active at ``step`` is floor(step / interval) mod n.

    Every LoRA gets exactly ``interval`` consecutive steps per turn (the reference code gives
    the first LoRA interval+1 steps; that artifact is not reproduced).
    """
    if interval < 1:
        raise ValueError("switch interval must be >= 1")
    if n < 1:
        raise ValueError("need at least one LoRA")
    return (step // interval) % n


def composite_weights(n: int) -> list[float]:
    """LoRA Composite: every LoRA's prediction counts equally (mean over LoRAs)."""
    return [1.0 / n] * n
