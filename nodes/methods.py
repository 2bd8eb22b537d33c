"""The composing methods of CMLoRA Apply and the CMLoRA Sampler, and the table that picks one.

* merge — every LoRA folded into the weights by the host, as chained ``LoraLoader`` nodes do;
* switch — one LoRA per step, rotating every ``switch_interval`` steps: folded into the
  weights when the active LoRA changes (the original parameter objects are kept and put
  back after the run), or routed to every row where the pack must not write the weights
  (the host manages them per forward under dynamic VRAM, or stores them quantized);
* composite — every LoRA's prediction, averaged: one forward over a copy of the rows per
  LoRA, each copy with its LoRA routed in;
* cmlora — see ``cmlora_runtime``.

Composing with other patches: LoRAs the host already patches into the model (``LoraLoader``,
method merge) are in the weights every row sees, so they stay in every row of every
method. A second composing node on a model that already has one is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..cmlora_core.errors import CMLoRAError
from ..cmlora_core.routing import combine_copies
from ..cmlora_core.steps import composite_weights, switch_active
from . import host
from .cmlora_runtime import CMLoRARuntime
from .loras import MappedLora
from .routed import ModelCall
from .runtime import RunTrace, Runtime, check_finite, new_key


class MergeCheck:
    """Merge's only wrapper: stops a run whose prediction turns NaN or infinite (plain data, so
    hosts may copy it between clones as they like)."""

    def __init__(self, node: str, names: list[str]):
        self.node, self.names = node, names

    def __call__(self, executor, *args, **kwargs):
        return check_finite(executor(*args, **kwargs), self.node,
                            [f"the merged LoRAs {self.names} (merge cannot tell which one)"], by="with")


def merge(clone, loras: list[MappedLora], node: str) -> None:
    for ml in loras:
        clone.add_patches(ml.patches, ml.entry.strength_model)
    clone.add_wrapper_with_key(host.WrappersMP.DIFFUSION_MODEL, new_key("merge"),
                               MergeCheck(node, [ml.entry.name for ml in loras]))


@dataclass
class SwitchTrace(RunTrace):
    active: dict = field(default_factory=dict)  # step -> LoRA index
    folds: int = 0
    routed: bool = False  # the active LoRA was routed in the forward instead of folded


class SwitchRuntime(Runtime):
    method = "switch"
    trace_type = SwitchTrace

    def __init__(self, loras: list[MappedLora], node: str, interval: int):
        if interval < 1:
            raise CMLoRAError(node, "switch_interval", "must be at least 1.", "set switch_interval to 1 or more.")
        self.interval = interval
        super().__init__(loras, node)

    def _reset(self) -> None:
        super()._reset()
        self._route = False
        self._saved: dict = {}  # weight key -> the original parameter object
        self._buffers = host.FoldBuffers()  # the folded weights, reused by every refold of a run
        self._folded: int | None = None

    def row_factor(self) -> int:
        return 1

    def _must_route(self, model_patcher) -> bool:
        """Route the active LoRA in the forward where the pack must not write the weights."""
        keys = [key for ml in self.loras for key in ml.patches if isinstance(key, str)]
        return not host.weights_writable(model_patcher, keys)

    def inject(self, model_patcher) -> None:
        if self._must_route(model_patcher):  # folding puts nothing on the model call's path
            super().inject(model_patcher)

    def begin_run(self, model_patcher) -> None:
        self._route = self._must_route(model_patcher)

    def model_call(self, executor, call: ModelCall, step: int):
        k = switch_active(step, self.interval, len(self.loras))
        trace = self.trace
        trace.active[step] = k
        trace.call_rows.append(call.rows)
        if self._route:
            trace.routed = True
            with self.routed.routed(self.routed.blocks(call.rows, [k])):
                return self.finite(call.run(executor), [k], step)
        self._fold(k)
        return self.finite(call.run(executor), [k], step)

    def _fold(self, k: int) -> None:
        if self._folded == k:
            return
        self._unfold()
        ml = self.loras[k]
        self._buffers.retain(ml.patches)
        for key, patch in ml.patches.items():  # plain float weights: see _must_route
            self._saved[key] = host.fold_patch(self.base_model, key, patch, ml.entry.strength_model, self._buffers)
        self._folded = k
        self.trace.folds += 1

    def _unfold(self) -> None:
        for key, original in self._saved.items():
            host.set_attr(self.base_model, key, original)
        self._saved.clear()
        self._folded = None

    def cleanup(self) -> None:
        self._unfold()
        self._buffers.clear()

    def details(self, trace: SwitchTrace) -> str:
        order = [trace.active[s] for s in sorted(trace.active)]
        how = "routed in the forward (the host owns these weights)" if trace.routed else f"{trace.folds} refolds"
        return f", {how}, active LoRA per step: {order}"


class CompositeRuntime(Runtime):
    method = "composite"

    def model_call(self, executor, call: ModelCall, step: int):
        indices = list(range(len(self.loras)))
        out = self.finite(self.evaluate(executor, call, indices), indices, step)
        return combine_copies(out, composite_weights(len(self.loras)))


RUNTIMES = {
    "switch": lambda loras, node, interval, schedule: SwitchRuntime(loras, node, interval),
    "composite": lambda loras, node, interval, schedule: CompositeRuntime(loras, node),
    "cmlora": lambda loras, node, interval, schedule: CMLoRARuntime(loras, node, schedule),
}
METHODS = ("merge", *RUNTIMES)


def apply_method(model, loras: list[MappedLora], method: str, switch_interval: int, node: str, schedule=None):
    """A clone of ``model`` that composes ``loras`` with ``method``; ``model`` is untouched."""
    if method not in METHODS:
        raise CMLoRAError(node, "method", f"unknown method {method!r}.", f"choose one of {', '.join(METHODS)}.")
    clone = model.clone()
    if method == "merge":
        merge(clone, loras, node)
    else:
        RUNTIMES[method](loras, node, switch_interval, schedule).attach(clone)
    return clone
