"""The composing methods of CMLoRA Apply and the CMLoRA Sampler, and the table that picks one.

* merge — every LoRA folded into the weights by the host, as chained ``LoraLoader`` nodes do;
* switch — one LoRA per step, rotating every ``switch_interval`` steps: folded into the
  weights when the active LoRA changes (the original parameter objects are kept and put
  back after the run), or routed to every row where the pack must not write the weights
  (the host manages them per forward under dynamic VRAM, or stores them quantized);
* composite — every LoRA's prediction, averaged: one forward over a copy of the rows per
  LoRA, each copy with its LoRA routed in;
* cmlora — see ``cmlora_runtime``;
* regions — each LoRA with a mask predicts inside its mask, the LoRAs without one (or the base
  model) everywhere else, in one forward over a copy of the rows per region.

Step ranges and strength curves (per stack entry): merge, CMLoRA and CLoRA apply every LoRA at
its strength for the step (0 outside its range); switch rotates through, and composite
averages, the LoRAs whose range holds the step; a step no LoRA is on runs the base model.
Merge with a step range routes the LoRAs in the forward (their strength changes per step).

Composing with other patches: LoRAs the host already patches into the model (``LoraLoader``,
method merge) are in the weights every row sees, so they stay in every row of every
method. A second composing node on a model that already has one is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..cmlora_core.errors import CMLoRAError
from ..cmlora_core.regions import MaskShapeError, combine_regions, latent_mask, region_weights
from ..cmlora_core.routing import Route, Routing, combine_copies
from ..cmlora_core.steps import SwitchTurns, composite_weights
from . import host
from .cmlora_runtime import CMLoRARuntime
from .loras import MappedLora
from .routed import ModelCall, check_routable
from .runtime import RunTrace, Runtime, check_finite, new_key


def weight_patches(patches: dict) -> dict[str, list]:
    """A LoRA's host patches grouped by the parameter they change: name -> [(patch, offset, function)]
    as the host's key gives them (offset (dim, first, count) for a slice of a fused layer, several
    per parameter; None and None for a plain key)."""
    out: dict[str, list] = {}
    for key, patch in patches.items():
        name, offset, function = host.patch_key(key)
        out.setdefault(name, []).append((patch, offset, function))
    return out


def switch_routes(model_patcher, loras: list[MappedLora]) -> bool:
    """Whether switch routes the active LoRA in the forward (where the pack must not write the
    weights: the host manages them per forward, or stores them quantized) instead of folding it."""
    keys = {host.patch_key(key)[0] for ml in loras for key in ml.patches}
    return not host.weights_writable(model_patcher, sorted(keys))


class MergeCheck:
    """Merge's only wrapper: stops a run whose prediction turns NaN or infinite (plain data, so
    hosts may copy it between clones as they like)."""

    def __init__(self, node: str, names: list[str]):
        self.node, self.names = node, names

    def __call__(self, executor, *args, **kwargs):
        return check_finite(executor(*args, **kwargs), self.node,
                            [f"the merged LoRAs {self.names} (merge cannot tell which one)"], by="with")


def merge(clone, loras: list[MappedLora], node: str) -> None:
    if any(ml.entry.scheduled for ml in loras):
        ScheduledMergeRuntime(loras, node).attach(clone)
        return
    for ml in loras:
        clone.add_patches(ml.patches, ml.entry.strength_model)
    clone.add_wrapper_with_key(host.WrappersMP.DIFFUSION_MODEL, new_key("merge"),
                               MergeCheck(node, [ml.entry.name for ml in loras]))


class ScheduledMergeRuntime(Runtime):
    """Merge where a LoRA has a step range or curve: every LoRA routed into every row at its strength
    for the step (the same sum as the host's merged weights, applied in the forward)."""

    method = "merge"

    def row_factor(self) -> int:
        return 1

    def model_call(self, executor, call: ModelCall, step: int):
        indices = self.on_at(step)
        self.trace.call_rows.append(call.rows)
        with self.routed.routed(self.routed.together(call.rows, indices)):
            out = call.run(executor)
        return check_finite(out, self.node, [f"the merged LoRAs {[self.loras[i].entry.name for i in indices]}"],
                            where=f" at step {step}", by="with")


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
        self._turns: list[int | None] = []
        self._turn_state: tuple | None = None  # SwitchTurns.state after the pass (handed to a pass continuing it)

    def row_factor(self) -> int:
        return 1

    def _must_route(self, model_patcher) -> bool:
        return switch_routes(model_patcher, self.loras)

    def inject(self, model_patcher) -> None:
        if self._must_route(model_patcher):  # folding puts nothing on the model call's path
            super().inject(model_patcher)

    def begin_run(self, model_patcher) -> None:
        self._route = self._must_route(model_patcher)

    def placed(self, noise) -> None:
        """The LoRA active at each step of the run (``SwitchTurns`` over the LoRAs on at each step),
        continuing the turns of the pass this one continues (``Runtime.handoff``)."""
        turns = SwitchTurns(self.interval, len(self.loras), self.handoff.state if self.handoff else None)
        every = set(range(len(self.loras)))
        self._turns = [turns.take(on_s) for on_s in (self.on_sets() or [every] * len(noise))]
        self._turn_state = turns.state

    def handoff_state(self):
        return self._turn_state

    def model_call(self, executor, call: ModelCall, step: int):
        k = self._turns[step]
        trace = self.trace
        trace.call_rows.append(call.rows)
        trace.active[step] = k
        if k is None:  # no LoRA is on at this step: the base model
            self._unfold()
            return self.finite(call.run(executor), [], step)
        if self._route:
            trace.routed = True
            with self.routed.routed(self.routed.blocks(call.rows, [k])):
                return self.finite(call.run(executor), [k], step)
        self._fold(k)
        return self.finite(call.run(executor), [k], step)

    def _fold(self, k: int) -> None:
        strength = self.routed.strengths[k]
        if self._folded == (k, strength):
            return
        self._unfold()
        ml = self.loras[k]
        by_weight = weight_patches(ml.patches)
        self._buffers.retain(by_weight)
        for key, patches in by_weight.items():  # plain float weights: see _must_route
            self._saved[key] = host.fold_patch(self.base_model, key, patches, strength, self._buffers)
        self._folded = (k, strength)
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
        order = ["base" if trace.active[s] is None else trace.active[s] for s in sorted(trace.active)]
        how = "routed in the forward (the host owns these weights)" if trace.routed else f"{trace.folds} refolds"
        return f", {how}, active LoRA per step: {order}"


class CompositeRuntime(Runtime):
    method = "composite"

    def model_call(self, executor, call: ModelCall, step: int):
        indices = self.on_at(step)
        if not indices:  # no LoRA's range holds this step: the base model
            self.trace.call_rows.append(call.rows)
            return self.finite(call.run(executor), [], step)
        out = self.finite(self.evaluate(executor, call, indices), indices, step)
        return combine_copies(out, composite_weights(len(indices)))


class RegionalRuntime(Runtime):
    """Method "regions": copy 0 of the rows with the LoRAs that have no mask (together, as merged),
    copy k with the k-th masked LoRA alone; mixed per pixel by the feathered masks."""

    method = "regions"

    def __init__(self, loras: list[MappedLora], node: str):
        self.masked = [i for i, ml in enumerate(loras) if ml.entry.mask is not None]
        if not self.masked:
            raise CMLoRAError(node, "stack", "method 'regions' needs at least one LoRA with a mask; this stack has none.",
                              "connect a MASK to the 'mask' input of the stack node of each LoRA to confine (or "
                              "choose another method).")
        self.unmasked = [i for i in range(len(loras)) if i not in self.masked]
        self._latent_masks: dict = {}  # (LoRA, latent size) -> its feathered mask on that latent
        self._weights: dict = {}
        super().__init__(loras, node)

    def row_factor(self) -> int:
        return 1 + len(self.masked)

    def weights(self, on: list[int], size, device) -> torch.Tensor:
        """(1 + len(on), h, w): the rest, then each masked LoRA in ``on`` (a masked LoRA off at this step
        leaves its region to the rest)."""
        key = (tuple(on), tuple(size), device)
        if key not in self._weights:
            masks = [self.latent_mask(i, tuple(size)) for i in on]
            w = region_weights(masks, size) if masks else torch.ones(1, *size)
            self._weights[key] = w.to(device)
        return self._weights[key]

    def sampler_sample(self, executor, *args, **kwargs):
        """Before the first model call: every mask checked against the run's latent (a mask of another
        aspect ratio is refused here, not after a forward) and feathered onto it once."""
        noise = host.sampler_sample_args(args, kwargs)[2]
        if torch.is_tensor(noise) and noise.dim() >= 4:
            for i in self.masked:
                self.latent_mask(i, tuple(noise.shape[-2:]))
        return super().sampler_sample(executor, *args, **kwargs)

    def latent_mask(self, i: int, size: tuple[int, int]) -> torch.Tensor:
        """LoRA ``i``'s mask feathered onto a latent of ``size`` (once per size)."""
        if (i, size) not in self._latent_masks:
            entry = self.loras[i].entry
            try:
                self._latent_masks[(i, size)] = latent_mask(entry.mask, entry.feather, size)
            except MaskShapeError as e:
                raise CMLoRAError("CMLoRA LoRA Stack", "mask", f"LoRA '{entry.name}': {e}.",
                                  "draw the mask at the image's size or aspect ratio (the mask editor on the "
                                  "image, or an empty mask of the latent's width and height x8).") from None
        return self._latent_masks[(i, size)]

    def model_call(self, executor, call: ModelCall, step: int):
        on = self.on_at(step)
        regions = [i for i in self.masked if i in on]
        rest = [i for i in self.unmasked if i in on]
        rows, copies = call.rows, 1 + len(regions)
        routes = [Route(i, 0, rows, self.routed.strengths[i]) for i in rest]
        routes += [Route(i, k * rows, (k + 1) * rows, self.routed.strengths[i]) for k, i in enumerate(regions, start=1)]
        self.trace.call_rows.append(rows * copies)
        with self.routed.routed(Routing(rows * copies, tuple(routes))):
            out = call.copies(copies).run(executor)
        labels = [f"the LoRAs without a mask {[self.loras[i].entry.name for i in rest]}" if rest else "the base model"]
        labels += [f"LoRA '{self.loras[i].entry.name}'" for i in regions]
        out = check_finite(out, self.node, labels, where=f" at step {step}")
        return combine_regions(out, self.call_weights(regions, call, tuple(out.shape[-2:]), out.device))

    def call_weights(self, regions: list[int], call: ModelCall, size: tuple[int, int], device) -> torch.Tensor:
        """The weights of one model call: the whole latent's, or, for the conds the host feeds as a crop
        of the latent (area prompts), each cond's rows get the part of them under its crop."""
        full = self.latent_hw or size
        if not self.cond_areas and size == full:  # no area prompt in this run
            return self.weights(regions, size, device)
        uuids = list(call.options.get("uuids") or [])
        boxes = [host.area_box(self.cond_areas[u], full) if u in self.cond_areas else None for u in uuids]
        if not any(boxes) and size == full:
            return self.weights(regions, size, device)
        whole = self.weights(regions, full, device)
        if not uuids or call.rows % len(uuids):
            raise CMLoRAError(self.node, "model", f"the host called the model on a {size[1]}x{size[0]} crop of the "
                              f"{full[1]}x{full[0]} latent without saying where it lies, so the regions cannot be "
                              "placed.", "use method 'regions' without area conditioning (Conditioning (Set Area), "
                              "Set Mask with 'mask bounds') on this host.")
        per_cond = []
        for box in boxes:
            h, w, y, x = box or (full[0], full[1], 0, 0)
            if (h, w) != size:
                raise CMLoRAError(self.node, "model", f"a cond's area {w}x{h} at ({x}, {y}) does not match the "
                                  f"{size[1]}x{size[0]} crop the host fed the model.",
                                  "use method 'regions' without area conditioning on this host.")
            per_cond.append(whole[:, y:y + h, x:x + w])
        rows = call.rows // len(uuids)
        return torch.stack(per_cond, 1).repeat_interleave(rows, dim=1)

    def details(self, trace: RunTrace) -> str:
        names = ", ".join(f"'{self.loras[i].entry.name}'" for i in self.masked)
        rest = ", ".join(f"'{self.loras[i].entry.name}'" for i in self.unmasked) or "the base model"
        return f", regions: {names} inside their masks, {rest} elsewhere; rows per call: {sorted(set(trace.call_rows))}"


RUNTIMES = {
    "switch": lambda loras, node, interval, schedule: SwitchRuntime(loras, node, interval),
    "composite": lambda loras, node, interval, schedule: CompositeRuntime(loras, node),
    "cmlora": lambda loras, node, interval, schedule: CMLoRARuntime(loras, node, schedule),
    "regions": lambda loras, node, interval, schedule: RegionalRuntime(loras, node),
}
METHODS = ("merge", *RUNTIMES)


def apply_method(model, loras: list[MappedLora], method: str, switch_interval: int, node: str, schedule=None):
    """A clone of ``model`` that composes ``loras`` with ``method``; ``model`` is untouched."""
    if method not in METHODS:
        raise CMLoRAError(node, "method", f"unknown method {method!r}.", f"choose one of {', '.join(METHODS)}.")
    masked = [ml.entry.name for ml in loras if ml.entry.mask is not None]
    if masked and method != "regions":
        raise CMLoRAError(node, "method", f"LoRA {', '.join(repr(n) for n in masked)} has a mask, which method "
                          f"'{method}' cannot honour.", "set method to 'regions', or disconnect the mask from its "
                          "stack node.")
    routes = switch_routes(model, loras) if method == "switch" else (
        method != "merge" or any(ml.entry.scheduled for ml in loras))
    if routes:
        check_routable(model.model, loras, node, method)
    clone = model.clone()
    if method == "merge":
        merge(clone, loras, node)
    else:
        RUNTIMES[method](loras, node, switch_interval, schedule).attach(clone)
    return clone
