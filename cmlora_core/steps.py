"""Which LoRA does what at which step: step lookup from sigmas, Switch and Composite rules.

Steps are counted on the sigma schedule the sampler was given
(``transformer_options["sample_sigmas"]``), never by counting model calls, so samplers that
evaluate the model several times per step, or between schedule points, map every
evaluation to the step it belongs to.
"""
from __future__ import annotations

import math

import torch


# Two noise levels closer than this (relative) are one: sigmas pass through float32 conversions on
# their way to the model, so a step's sigma seen in a model call, a range's boundary computed by the
# model's percent_to_sigma and a schedule point may differ by that rounding.
SIGMA_TOLERANCE = 1e-5


def same_sigma(a: float, b: float) -> bool:
    """Whether noise levels ``a`` and ``b`` are one, to float32 rounding (relative to ``b``, at least 1)."""
    return abs(a - b) <= SIGMA_TOLERANCE * max(1.0, abs(b))


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
    threshold = sig * (1 - SIGMA_TOLERANCE) - 1e-8
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


class SwitchTurns:
    """LoRA Switch over a run in which LoRAs come and go: which LoRA each step gets, step by step.

    Turns: a turn starts at a step, goes to the first LoRA after the previous turn's (in stack order,
    wrapping around) that is on at that step, and lasts ``interval`` steps; it ends early when its
    LoRA goes off, and the next turn starts there. A step with no LoRA on has none (the base model)
    and starts no turn. With every LoRA on throughout this is ``switch_active``: each LoRA in turn
    for exactly ``interval`` steps; a LoRA that is on when a turn starts and whose turn it is, is never
    passed over. ``state`` is where the turns stand after the steps taken so far: a sampler pass that
    continues another one's leftover noise starts from the state that pass ended in.
    """

    def __init__(self, interval: int, n: int, state: tuple | None = None):
        if interval < 1:
            raise ValueError("switch interval must be >= 1")
        self.interval, self.n = interval, n
        self.state = state or (None, 0, -1)  # (LoRA holding the turn, steps left in it, last LoRA given a turn)

    def take(self, on_s) -> int | None:
        """The LoRA of the next step, whose LoRAs on are ``on_s``."""
        holder, left, previous = self.state
        if left > 0 and holder in on_s:
            self.state = (holder, left - 1, previous)
            return holder
        if not on_s:
            self.state = (None, 0, previous)
            return None
        holder = min(on_s, key=lambda i: (i - previous - 1) % self.n)
        self.state = (holder, self.interval - 1, holder)
        return holder


def switch_turns(on: list, interval: int, n: int) -> list[int | None]:
    """The LoRA active at each step of a run whose step s has the LoRAs ``on[s]`` (of ``n``) on."""
    turns = SwitchTurns(interval, n)
    return [turns.take(on_s) for on_s in on]


def composite_weights(n: int) -> list[float]:
    """LoRA Composite: every LoRA's prediction counts equally (mean over LoRAs)."""
    return [1.0 / n] * n


# ---------------------------------------------------------------- per-LoRA range and strength curve, on the noise level

CURVES = ("constant", "linear", "smooth")

class NoiseSteps:
    """The steps of one sampler pass, placed on the noise level.

    ``sigmas[i]`` is the noise level step i starts at. ``sigma_at(p)`` maps a place p between pure
    noise (0) and the clean image (1) to a noise level: the model's ``percent_to_sigma``, the measure
    of ControlNet's and conditioning's ``start_percent``/``end_percent`` and of hook keyframes. A range
    [start, end) holds the steps whose noise level lies at or below ``sigma_at(start)`` and above
    ``sigma_at(end)``; since the measure is the noise level, not the step count, a range means the same
    part of the sampling when one run is split into several passes (KSamplerAdvanced's start/end steps,
    SplitSigmas). On ComfyUI's ``normal`` and ``simple`` schedulers a range [0, 0.5) holds the first half of
    an even number of steps, as a count of steps would.
    """

    def __init__(self, sigmas, sigma_at):
        self.sigmas = tuple(float(s) for s in sigmas)
        self.sigma_at = sigma_at
        self._positions: dict[int, float] = {}
        self._bounds: dict[tuple[float, float], list[int]] = {}

    @classmethod
    def of(cls, sample_sigmas, percent_to_sigma) -> "NoiseSteps":
        """A pass's steps from its schedule (T+1 falling values; the last ends the last step)."""
        points = sample_sigmas.reshape(-1).tolist() if torch.is_tensor(sample_sigmas) else list(sample_sigmas)
        return cls(points[:-1] or points[:1], lambda p: float(percent_to_sigma(p)))

    @classmethod
    def even(cls, total: int) -> "NoiseSteps":
        """``total`` steps evenly spaced on the noise level (step i starts at place i / total): the
        Scheduler's preview, where no model and sampler are known."""
        return cls([1.0 - i / total for i in range(total)], lambda p: 1.0 - p)

    def __len__(self) -> int:
        return len(self.sigmas)

    def steps_on(self, start: float, end: float) -> list[int]:
        """The steps a range [start, end) holds (see the class); end 1 reaches the last step."""
        key = (start, end)
        if key not in self._bounds:
            top, bottom = self.sigma_at(start), self.sigma_at(end)
            self._bounds[key] = [i for i, s in enumerate(self.sigmas)
                                 if _at_or_below(s, top) and not _at_or_below(s, bottom)]
        return self._bounds[key]

    def position(self, step: int) -> float:
        """Where step ``step`` starts, between pure noise (0) and the clean image (1): the p with
        sigma_at(p) equal to the step's noise level (bisection; sigma_at falls as p grows)."""
        if step not in self._positions:
            sigma, lo, hi = self.sigmas[step], 0.0, 1.0
            for _ in range(48):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if self.sigma_at(mid) > sigma else (lo, mid)
            # to 6 decimals (a thousandth of a timestep): the host's schedules pass through float32, so the
            # last step lies a hair off place 1 (1 - 1.5e-10 on ComfyUI 0.33), and a step at a range's end
            # must get strength_end exactly (a curve to 0 turns the LoRA off there). Ranges are decided on
            # sigma, not on these places.
            self._positions[step] = round(0.5 * (lo + hi), 6)
        return self._positions[step]


def _at_or_below(sigma: float, bound: float) -> bool:
    """A step whose noise level is a range's boundary (to float32 rounding) belongs to the range starting there."""
    return sigma <= bound * (1 + SIGMA_TOLERANCE) + 1e-12


def curve_strength(strength: float, strength_end: float, curve: str, position: float, start: float, end: float) -> float:
    """The strength of a LoRA on [start, end) at ``position`` (a place on the noise level within the
    range): ``strength`` for the constant curve, else a ramp from ``strength`` at ``start`` to
    ``strength_end`` at ``end`` (linear, or smooth: the cosine ease 0.5 - 0.5 cos(pi t))."""
    if curve == "constant":
        return strength
    t = min(1.0, max(0.0, (position - start) / (end - start)))
    if curve == "smooth":
        t = 0.5 - 0.5 * math.cos(math.pi * t)
    elif curve != "linear":
        raise ValueError(f"unknown strength curve {curve!r}")
    return strength + (strength_end - strength) * t


# ---------------------------------------------------------------- the whole run behind a pass that leaves noise

MAX_STEPS = 1000  # the longest run a split pass is matched against (the host allows 10000; the search costs O(T))


def whole_run_totals(points, schedule, names, max_steps: int = MAX_STEPS) -> list[int]:
    """The step counts T of the runs whose first ``len(points) - 1`` steps are ``points``.

    A pass that stops with noise left (KSamplerAdvanced's ``end_at_step`` with leftover noise, or a
    split of a scheduler's sigmas) holds the first points of a T-step schedule, and nothing it is given
    says T. ``schedule(name, T)`` gives the T+1 points of scheduler ``name``; a T is kept when some
    scheduler's first points equal ``points`` (to float32 rounding) and the run goes on past them.
    Each scheduler's point k grows with T (more steps, smaller steps): the search doubles T from the
    pass's length until the pass's last point is reached, bisects, then looks at the neighbours and at
    the T sharing that point (schedulers that pick from a table of noise levels; at most 64 of them). Where
    the point does not grow with T (``ddim_uniform``, whose first point moves with T; ``beta`` past about 140
    steps) a count may be missed; a run found by none is a clear error for the caller. Sorted; empty when the pass is the start of no such run.
    """
    points = [float(p) for p in points]
    k = len(points) - 1
    if k < 1 or points[-1] <= 0 or k >= max_steps:
        return []
    found: set[int] = set()
    for name in names:
        found.update(_totals_of(points, lambda t, name=name: schedule(name, t), max_steps))
    return sorted(found)


def _totals_of(points: list[float], schedule, max_steps: int) -> list[int]:
    """``whole_run_totals`` for one scheduler, ``schedule(T)``."""
    k, target = len(points) - 1, points[-1]
    runs: dict[int, list[float]] = {}

    def run(t: int) -> list[float]:
        if t not in runs:
            runs[t] = [float(v) for v in schedule(t)]
        return runs[t]

    def reached(t: int) -> bool:  # the run's point k is at or above the pass's last
        s = run(t)
        return len(s) > k and (s[k] >= target or same_sigma(s[k], target))

    hi = k + 1  # runs are mostly short: double from the pass's length, then bisect
    while hi < max_steps and not reached(hi):
        hi = min(max_steps, 2 * hi)
    lo = max(k + 1, hi // 2)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if reached(mid) else (mid + 1, hi)
    near = set(range(max(k + 1, lo - 4), min(max_steps, lo + 4) + 1))
    t = lo + 1
    while t <= max_steps and len(near) < 64 and len(run(t)) > k and same_sigma(run(t)[k], target):
        near.add(t)
        t += 1
    return [t for t in sorted(near) if len(run(t)) > k + 1 and all(same_sigma(a, b) for a, b in zip(run(t), points))]
