"""Which LoRA does what at which step: step lookup from sigmas, Switch and Composite rules.

Steps are counted on the sigma schedule the sampler was given
(``transformer_options["sample_sigmas"]``), never by counting model calls, so samplers that
evaluate the model several times per step, or between schedule points, map every
evaluation to the step it belongs to.
"""
from __future__ import annotations

import math

import torch


def step_index(sample_sigmas, sigma) -> int:
    """Index i of the step an evaluation at ``sigma`` belongs to, 0 <= i < T.

    ``sample_sigmas`` holds T+1 descending values (the last is usually 0), as a tensor or a
    list of floats. Step i runs from sample_sigmas[i] down to sample_sigmas[i+1]; an
    evaluation at sigma belongs to the last i with sample_sigmas[i] >= sigma, which also
    covers the intermediate sigmas of Heun or DPM++ 2S and the first point of a sliced
    (KSamplerAdvanced) schedule.
    """
    sig = float(sigma.reshape(-1)[0]) if torch.is_tensor(sigma) else float(sigma)
    points = sample_sigmas.reshape(-1).tolist() if torch.is_tensor(sample_sigmas) else list(sample_sigmas)
    points = points[:-1]
    if not points:
        return 0
    # tolerance: sigmas pass through float32 conversions on the way to the model
    threshold = sig * (1 - 1e-5) - 1e-8
    count = sum(1 for p in points if p >= threshold)
    return max(0, min(len(points) - 1, count - 1))


# Samplers whose step i also evaluates the model at the following schedule point(s): Heun's
# corrector at sigma[i+1], Heun++'s at sigma[i+1] and sigma[i+2]. Every other sampler of the
# host evaluates step i at sigma[i] or between sigma[i] and sigma[i+1].
END_POINT_SAMPLERS = frozenset({"sample_heun", "sample_heunpp2"})


class StepClock:
    """The step each model evaluation of one sampler run belongs to.

    By sigma (``step_index``), except for samplers in ``END_POINT_SAMPLERS``: for them an
    evaluation at a lower sigma than the one before continues that step (Heun's corrector
    at sigma[i+1] is step i's), and a step starts where the sigma stops falling (the next
    evaluation at sigma[i+1] is step i+1's first).
    """

    def __init__(self, sampler: str = ""):
        self.end_points = sampler in END_POINT_SAMPLERS
        self._last: tuple[float, int] | None = None

    def step(self, sample_sigmas, sigma) -> int:
        sig = float(sigma.reshape(-1)[0]) if torch.is_tensor(sigma) else float(sigma)
        if self.end_points and self._last is not None and sig < self._last[0]:
            step = self._last[1]
        else:
            step = step_index(sample_sigmas, sig)
        self._last = (sig, step)
        return step


def num_steps(sample_sigmas) -> int:
    n = sample_sigmas.reshape(-1).numel() if torch.is_tensor(sample_sigmas) else len(sample_sigmas)
    return max(1, n - 1)


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


def switch_turns(on: list, interval: int, n: int) -> list[int | None]:
    """LoRA Switch over a run in which LoRAs come and go: the LoRA active at each step.

    ``on[s]`` holds the indices (of ``n`` LoRAs) that are on at step s. Turns: a turn starts at a
    step, goes to the first LoRA after the previous turn's (in stack order, wrapping around) that is
    on at that step, and lasts ``interval`` steps; it ends early when its LoRA goes off, and the next
    turn starts there. A step with no LoRA on has none (the base model) and starts no turn. With every
    LoRA on throughout this is ``switch_active``: each LoRA in turn for exactly ``interval`` steps;
    a LoRA that is on when a turn starts and whose turn it is, is never passed over.
    """
    if interval < 1:
        raise ValueError("switch interval must be >= 1")
    out: list[int | None] = []
    holder, left, previous = None, 0, -1
    for on_s in on:
        if left > 0 and holder in on_s:
            out.append(holder)
            left -= 1
            continue
        if not on_s:
            holder, left = None, 0
            out.append(None)
            continue
        holder = min(on_s, key=lambda i: (i - previous - 1) % n)
        previous, left = holder, interval - 1
        out.append(holder)
    return out


def composite_weights(n: int) -> list[float]:
    """LoRA Composite: every LoRA's prediction counts equally (mean over LoRAs)."""
    return [1.0 / n] * n


# ---------------------------------------------------------------- per-LoRA step range and strength curve

CURVES = ("constant", "linear", "smooth")


def active_range(start: float, end: float, total: int) -> range:
    """The steps of a ``total``-step run that a LoRA limited to [start, end) (fractions of the run) is on.

    Step i is on when start <= (i + 0.5) / total < end, i.e. when the middle of the step lies in the
    range: a range of half the run is on for exactly half of an even number of steps, and the
    fractions map to the same steps whatever the sampler (steps are found by sigma).
    """
    first = next((i for i in range(total) if (i + 0.5) / total >= start), total)
    stop = next((i for i in range(first, total) if (i + 0.5) / total >= end), total)
    return range(first, stop)


def curve_strength(strength: float, strength_end: float, curve: str, step: int, steps: range) -> float:
    """The strength at ``step`` of a LoRA on ``steps``: 0 outside them; inside, ``strength`` for the
    constant curve, else a ramp from ``strength`` on the first step to ``strength_end`` on the last
    (linear, or smooth: the cosine ease 0.5 - 0.5 cos(pi t))."""
    if step not in steps:
        return 0.0
    if curve == "constant" or len(steps) == 1:
        return strength
    t = (step - steps.start) / (len(steps) - 1)
    if curve == "smooth":
        t = 0.5 - 0.5 * math.cos(math.pi * t)
    elif curve != "linear":
        raise ValueError(f"unknown strength curve {curve!r}")
    return strength + (strength_end - strength) * t
