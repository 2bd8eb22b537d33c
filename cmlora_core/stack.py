"""The LoRA stack: an ordered, immutable list of LoRA entries and their settings."""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import CMLoRAError
from .steps import CURVES, NoiseSteps, curve_strength

CATEGORIES = ("auto", "character", "clothing", "style", "background", "object")


@dataclass(frozen=True)
class LoraEntry:
    """One LoRA of a stack.

    ``name`` is the file name as the host lists it (``loras`` folder), ``path`` the resolved
    file; ``category`` one of CATEGORIES; ``concept`` the prompt words the LoRA depicts;
    ``trigger`` its trigger words (from the file's metadata when left empty by the user).
    ``start``/``end`` limit the LoRA to part of the sampling, measured on the noise level from pure
    noise (0) to the clean image (1) as ControlNet's start/end percent are (``steps.NoiseSteps``);
    ``curve`` and ``strength_end`` ramp its model strength over that part (see ``strength_at``). ``mask``
    confines the LoRA to a region (method "regions"), its edge softened over ``feather`` pixels.
    """

    name: str
    path: str
    strength_model: float = 1.0
    strength_clip: float = 1.0
    enabled: bool = True
    category: str = "auto"
    concept: str = ""
    trigger: str = ""
    info: object = None  # LoraFileInfo, kept for reports
    start: float = 0.0
    end: float = 1.0
    curve: str = "constant"  # one of steps.CURVES
    strength_end: float = 0.0  # the strength at the range's end (curves other than constant)
    mask: object = field(default=None, compare=False, repr=False)  # (H, W) region for method "regions"
    feather: float = 0.0  # the mask's soft edge, in the mask's pixels

    def __post_init__(self):
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"step range [{self.start}, {self.end}) is not within 0..1 with start < end")
        if self.curve not in CURVES:
            raise ValueError(f"unknown strength curve {self.curve!r}")

    @property
    def scheduled(self) -> bool:
        """Whether the LoRA's model strength changes during the run."""
        return self.start > 0.0 or self.end < 1.0 or self.curve != "constant"

    def strength_at(self, step: int, steps: NoiseSteps) -> float:
        """The model strength at ``step`` of a sampler pass whose steps are ``steps`` (0 outside the
        LoRA's range)."""
        if not self.scheduled:
            return self.strength_model
        if step not in steps.steps_on(self.start, self.end):
            return 0.0
        position = steps.position(step) if self.curve != "constant" else self.start
        return curve_strength(self.strength_model, self.strength_end, self.curve, position, self.start, self.end)

    def describe_schedule(self) -> str:
        """The range and curve in words, for reports ('' when the LoRA is on at one strength throughout)."""
        if not self.scheduled:
            return ""
        text = f"noise {self.start:.0%}-{self.end:.0%}"
        if self.curve != "constant":
            text += f", strength {self.strength_model:g} -> {self.strength_end:g} ({self.curve})"
        return text

    @property
    def active_model(self) -> bool:
        """Whether the LoRA changes the diffusion model at some step: enabled, and its strength is not 0
        on every step (a curve from 0 to a non-zero ``strength_end`` fades the LoRA in)."""
        ramps = self.curve != "constant" and self.strength_end != 0.0
        return self.enabled and (self.strength_model != 0.0 or ramps)

    @property
    def active_clip(self) -> bool:
        return self.enabled and self.strength_clip != 0.0


def strength_table(entries, steps: NoiseSteps) -> list[tuple[float, ...]]:
    """Each entry's model strength at each step of a pass (``LoraEntry.strength_at``), one row per step."""
    return [tuple(e.strength_at(s, steps) for e in entries) for s in range(len(steps))]


def on_sets(entries, steps: NoiseSteps) -> list[set[int]]:
    """The entries on at each step of a pass: those whose strength there is not 0."""
    return [{i for i, v in enumerate(row) if v != 0.0} for row in strength_table(entries, steps)]


@dataclass(frozen=True)
class LoraStack:
    """An ordered tuple of entries; chaining stack nodes appends in graph order."""

    entries: tuple[LoraEntry, ...] = ()

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def append(self, entry: LoraEntry, node: str = "CMLoRA LoRA Stack") -> "LoraStack":
        for e in self.entries:
            if os_same(e.path, entry.path):
                raise CMLoRAError(
                    node, "lora_name",
                    f"LoRA '{entry.name}' is already in this stack (entry {self.entries.index(e) + 1}).",
                    "remove the duplicate node or pick another LoRA; to make one LoRA stronger, raise its strength.")
        return LoraStack(self.entries + (entry,))

    def model_entries(self) -> tuple[LoraEntry, ...]:
        """Entries that change the diffusion model (``active_model``)."""
        return tuple(e for e in self.entries if e.active_model)

    def clip_entries(self) -> tuple[LoraEntry, ...]:
        return tuple(e for e in self.entries if e.active_clip)


def os_same(a: str, b: str) -> bool:
    import os

    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def require_model_entries(stack: LoraStack | None, node: str, input: str = "stack") -> tuple[LoraEntry, ...]:
    """The entries a method composes, or a clear error when there are none."""
    if stack is None or len(stack) == 0:
        raise CMLoRAError(node, input, "the LoRA stack is empty.",
                          "connect a 'CMLoRA LoRA Stack' node with at least one LoRA.")
    entries = stack.model_entries()
    if not entries:
        skipped = ", ".join(f"'{e.name}' ({'disabled' if not e.enabled else 'strength_model 0'})" for e in stack)
        raise CMLoRAError(node, input, f"every LoRA in the stack is inactive: {skipped}.",
                          "enable at least one entry and give it a non-zero strength_model.")
    return entries
