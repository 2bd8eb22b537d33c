"""CMLoRA: frequency sets, dominant-LoRA schedules and cache plans.

Everything here is a pure function of the number of steps T and the settings, except the
online mode's phase change, which the runtime reports through ``Planner.observe``.

Vocabulary. A *full pass* runs the whole UNet for a LoRA and refreshes its cached deep
feature; a *shallow pass* runs only the outer full-resolution blocks around the cached
feature; with cache "prediction" a non-refreshed LoRA reuses its last full prediction
(no pass at all); with cache "none" — or a uniform refresh every step, which leaves nothing to cache —
every LoRA runs a full pass at every step.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

MODES = ("offline", "online", "async")
CACHES = ("deep", "prediction", "none")
REFRESH = ("nonuniform", "uniform")
W_DOM = ("constant", "decay")

FULL, SHALLOW, REUSE, OFF = "full", "shallow", "reuse", "off"  # OFF: the LoRA is off at the step, no pass


# ------------------------------------------------------------------ H / L sets

def split_sets(scores: list[float], baseline: float, categories: list[str]) -> tuple[list[int], list[int]]:
    """H and L index lists, each ordered by descending score.

    A LoRA is H when its score exceeds the baseline's; a category other than 'auto'
    overrides the measurement (background -> L, any other -> H).
    """
    high, low = [], []
    for i, (s, c) in enumerate(zip(scores, categories)):
        is_high = (s > baseline) if c == "auto" else (c != "background")
        (high if is_high else low).append(i)
    high.sort(key=lambda i: -scores[i])
    low.sort(key=lambda i: -scores[i])
    return high, low


def sets_from_categories(categories: list[str]) -> tuple[list[int], list[int]]:
    """The reference code's fixed split, used without a profile: background = L, the rest H."""
    high = [i for i, c in enumerate(categories) if c != "background"]
    low = [i for i, c in enumerate(categories) if c == "background"]
    return high, low


# ------------------------------------------------------------------ clocks

def steps_below(fraction: float, total: int) -> int:
    """How many steps i satisfy i < fraction * total, compared with a tolerance so that float
    noise does not move a boundary (0.55 * 220 = 121.00000000000001 still gives 121)."""
    return max(0, math.ceil(fraction * total - 1e-9))


def band_start(fraction: float, total: int) -> int:
    """Where a refresh band starts: int(fraction * total), as the reference's ranges (7 for 0.375 * 20)."""
    return max(0, math.floor(fraction * total + 1e-9))


def refresh_steps(total: int, policy: str, interval: int = 2) -> list[int]:
    """Steps at which cached features are refreshed; always includes step 0.

    uniform: every ``interval`` steps. nonuniform: the reference's three bands, each a range
    starting at its own boundary: every 2 steps from 0 to 0.375T, every 3 from there to
    0.875T, every 2 from there to T (T=20: 0, 2, 4, 6, 7, 10, 13, 16, 17, 19).
    """
    if policy == "uniform":
        if interval < 1:
            raise ValueError("refresh interval must be >= 1")
        return list(range(0, total, interval))
    if policy != "nonuniform":
        raise ValueError(f"unknown refresh policy {policy!r}")
    first, second = band_start(0.375, total), band_start(0.875, total)
    steps = list(range(0, first, 2)) + list(range(first, second, 3)) + list(range(second, total, 2))
    return steps if steps and steps[0] == 0 else [0] + steps


def dominant_weight(mode: str, n: int, step: int, total: int) -> float:
    """w_dom: N - 0.5 (the reference), or decaying linearly to 1 at the last step (our reading of the paper)."""
    start = n - 0.5
    if mode == "constant" or total <= 1:
        return start
    if mode != "decay":
        raise ValueError(f"unknown w_dom mode {mode!r}")
    return start + (1.0 - start) * step / (total - 1)


def step_weights(n: int, dominant: int, w_dom: float) -> list[float]:
    """Normalised aggregation weights: (w_dom * eps_dom + sum_others eps_j) / (w_dom + N - 1)."""
    denom = w_dom + n - 1
    return [(w_dom if i == dominant else 1.0) / denom for i in range(n)]


# ------------------------------------------------------------------ schedule settings

@dataclass(frozen=True)
class ScheduleSettings:
    mode: str = "offline"
    switch_interval: int = 5
    cache: str = "deep"
    refresh: str = "nonuniform"
    refresh_interval: int = 2
    h_to_l_fraction: float = 0.55
    online_threshold: float = 0.5
    w_dom: str = "constant"
    dominant_full: bool = True

    def validate(self) -> None:
        for name, value, options in (("mode", self.mode, MODES), ("cache", self.cache, CACHES),
                                     ("refresh", self.refresh, REFRESH), ("w_dom", self.w_dom, W_DOM)):
            if value not in options:
                raise ValueError(f"{name} must be one of {options}, got {value!r}")
        if self.switch_interval < 1 or self.refresh_interval < 1:
            raise ValueError("intervals must be >= 1")
        if not 0.0 <= self.h_to_l_fraction <= 1.0:
            raise ValueError("h_to_l_fraction must be within [0, 1]")


@dataclass(frozen=True)
class Schedule:
    """A CMLoRA schedule: settings plus the stack's H/L order. Steps are known only at sampling."""

    settings: ScheduleSettings
    high: tuple[int, ...]  # stack indices (of the active model entries), descending score
    low: tuple[int, ...]
    names: tuple[str, ...]  # entry names, to check the schedule belongs to the stack it is used with
    source: str = "categories"  # "profile" or "categories"
    base_model: str = ""  # fingerprint of the model the profile was measured on ("" without a profile)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["settings"] = asdict(self.settings)
        return d

    @property
    def order(self) -> tuple[int, ...]:
        return self.high + self.low


@dataclass
class StepPlan:
    """What step i does: the dominant LoRA, aggregation weights, and each LoRA's pass."""

    step: int
    dominant: int | None  # None: no LoRA is on at the step (the base model runs)
    weights: list[float]
    passes: list[str]  # FULL | SHALLOW | REUSE | OFF per LoRA (stack order)
    phase: str = "H"


@dataclass
class Planner:
    """Turns a Schedule into per-step plans for a run of ``total`` steps.

    Offline and online: the dominant role rotates over the current set (H, then L — or H
    again if L is empty), moving on at each refresh step; the new dominant gets the full
    pass. Online changes phase when ``observe`` reports a high-frequency share below the
    threshold (0 never changes). Async: the dominant moves every switch interval over H then
    L, and each refresh step refreshes the next LoRA in that order, independently.

    ``on`` (one set of stack indices per step; None: every LoRA on every step) limits each step
    to the LoRAs on there (step ranges and curves): the dominant is chosen among them, the
    weights are normalised over them, a LoRA off at the step gets no pass (OFF) and a full pass
    when it comes back on; a step with none on has no dominant (the base model runs).
    """

    schedule: Schedule
    total: int
    on: list | None = None
    phase_low: bool = False  # online: set by observe()
    switched_at: int | None = None
    _refresh: set = field(default_factory=set)
    _phase: str = "H"
    _pointer: int = 0
    _phase_start: int = 0
    _async_refresh: int = 0
    _last_step: int = -1
    _cache: dict = field(default_factory=dict)

    def __post_init__(self):
        self._refresh = set(refresh_steps(self.total, self.schedule.settings.refresh,
                                          self.schedule.settings.refresh_interval))

    @property
    def n(self) -> int:
        return len(self.schedule.high) + len(self.schedule.low)

    def _offline_low(self, step: int) -> bool:
        return step >= steps_below(self.schedule.settings.h_to_l_fraction, self.total)

    def observe(self, step: int, hf_share: float) -> None:
        """Online mode: the predicted x0's high-frequency share after ``step``."""
        s = self.schedule.settings
        if s.mode == "online" and not self.phase_low and s.online_threshold > 0 and hf_share < s.online_threshold:
            self.phase_low = True
            self.switched_at = step + 1

    def plan(self, step: int) -> StepPlan:
        """The plan of ``step``; repeated calls for one step (several model evaluations) agree."""
        if step in self._cache:
            return self._cache[step]
        for s in range(self._last_step + 1, step + 1):
            self._cache[s] = self._advance(s)
        self._last_step = max(self._last_step, step)
        return self._cache[step]

    def _on(self, step: int):
        return None if self.on is None else self.on[step]

    def _advance(self, step: int) -> StepPlan:
        s = self.schedule.settings
        n = len(self.schedule.order)
        on = self._on(step)
        high = [i for i in self.schedule.high if on is None or i in on]
        low = [i for i in self.schedule.low if on is None or i in on]
        order = high + low
        if not order:
            return StepPlan(step, None, [0.0] * n, [OFF] * n, self._phase)
        back = set() if step == 0 or on is None else set(order) - set(self._on(step - 1))
        refresh = step in self._refresh
        passes = [OFF] * n
        if s.mode == "async":
            dominant = order[(step // s.switch_interval) % len(order)]
            phase = "H" if dominant in high else "L"
            refreshed = [] if step == 0 else ([order[self._async_refresh % len(order)]] if refresh else [])
            if refresh and step > 0:
                self._async_refresh += 1
        else:
            want_low = (self._offline_low(step) if s.mode == "offline" else self.phase_low) and bool(low)
            phase = "L" if want_low else "H"
            if step == 0 or phase != self._phase:
                self._phase, self._pointer, self._phase_start = phase, 0, step
            elif refresh:
                self._pointer += 1
            current = low if phase == "L" else (high or low)
            dominant = current[self._pointer % len(current)]
            refreshed = [dominant] if (refresh or step == self._phase_start) else []
        no_cache = s.cache == "none" or (s.refresh == "uniform" and s.refresh_interval == 1)
        for i in order:
            if step == 0 or no_cache or i in refreshed or i in back or (s.dominant_full and i == dominant):
                passes[i] = FULL
            else:
                passes[i] = SHALLOW if s.cache == "deep" else REUSE
        w = dominant_weight(s.w_dom, len(order), step, self.total)
        weights = [0.0] * n
        for i, wi in zip(order, step_weights(len(order), order.index(dominant), w)):
            weights[i] = wi
        return StepPlan(step, dominant, weights, passes, phase)


class ScheduleMismatch(ValueError):
    """A schedule that cannot compose this stack or this run: ``problem`` and ``fix`` in words."""

    def __init__(self, input: str, problem: str, fix: str):
        super().__init__(problem)
        self.input, self.problem, self.fix = input, problem, fix


def check_schedule(schedule: Schedule, names, total: int | None = None) -> None:
    """The one rule for composing with a schedule, checked where the stack is known (``names``,
    the active entries in stack order) and again when the run's step count ``total`` is known:
    the schedule was made for these LoRAs, there are at least two, and at least as many steps."""
    names = tuple(names)
    if tuple(schedule.names) != names:
        raise ScheduleMismatch("schedule", f"the schedule was made for the LoRAs {list(schedule.names)}, but this "
                               f"stack composes {list(names)}.",
                               "rebuild the schedule from this stack (re-run the profiler/scheduler).")
    if len(names) < 2:
        raise ScheduleMismatch("stack", f"CMLoRA composes at least 2 LoRAs; the stack has {len(names)} active LoRA.",
                               "add LoRAs, or use method 'merge' for a single LoRA.")
    if total is not None and total < len(names):
        raise ScheduleMismatch("schedule", f"{len(names)} LoRAs need at least {len(names)} steps, the run has {total}.",
                               "sample with at least as many steps as the stack has LoRAs.")
