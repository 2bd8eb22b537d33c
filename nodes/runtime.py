"""The multi-LoRA runtime on a ModelPatcher clone: merge, switch and routed composite.

Two ways to apply a LoRA, chosen per method and per model call:

* folded — deltas shared by every row of a call go into the weights with the host's own
  ``calculate_weight`` (what ``LoraLoader`` does). Merge adds its patches to the clone and
  lets the host fold them; Switch refolds only when the active LoRA changes, keeping the
  original parameter objects and putting them back at the end of the run.
* routed — deltas that differ between rows of one batch are added in the forward pass by
  forward hooks that a ``PatcherInjection`` installs on the clone; the routing table is set
  for each model call by a ``DIFFUSION_MODEL`` wrapper and cleared right after it, so the
  hooks do nothing in any other run.

An ``OUTER_SAMPLE`` wrapper brackets each run and restores the model whether the run
finished, failed or was interrupted.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from ..cmlora_core.errors import CMLoRAError
from ..cmlora_core.routing import DenseDelta, LowRankDelta, RoutedLayer, Routing, combine_copies, repeat_rows
from ..cmlora_core.schedule import composite_weights, num_steps, step_index, switch_active
from . import host
from .loras import MappedLora

log = logging.getLogger("cmlora")

KEY = "cmlora"
METHODS = ("merge", "switch", "composite", "cmlora")


@dataclass
class RunTrace:
    """What one sampling run did (read by reports and tests)."""

    method: str
    steps: int = 0
    model_calls: int = 0
    rows: int = 0
    active: dict = field(default_factory=dict)  # step -> LoRA index (switch)
    call_rows: list = field(default_factory=list)  # rows of every diffusion-model call
    folds: int = 0
    seconds: float = 0.0
    status: str = "running"


def _module_kind(module) -> tuple[str, dict]:
    if isinstance(module, torch.nn.Conv2d):
        return "conv", {"stride": module.stride, "padding": module.padding, "dilation": module.dilation,
                        "groups": module.groups}
    if isinstance(module, torch.nn.Linear):
        return "linear", {}
    raise CMLoRAError("CMLoRA Apply", "method",
                      f"layer type {type(module).__name__} cannot take a routed LoRA delta.",
                      "use method 'merge' for this model.")


def build_delta(base_model, key: str, patch):
    """The routed form of one host patch on one weight (or bias) key."""
    module_path, param = key.rsplit(".", 1)
    module = host.get_attr(base_model, module_path)
    kind, conv = _module_kind(module)
    weight = getattr(module, param)
    if param == "weight" and isinstance(patch, host.LoRAAdapter):
        up, down, alpha, mid, dora, reshape = patch.weights
        groups = conv.get("groups", 1)
        if mid is None and dora is None and reshape is None and groups == 1:
            rank = down.shape[0]
            scale = (alpha / rank) if alpha is not None else 1.0
            if kind == "linear":
                return module_path, LowRankDelta(down.reshape(rank, -1), up.reshape(up.shape[0], rank), scale, kind)
            return module_path, LowRankDelta(down.reshape(rank, *weight.shape[1:]), up.reshape(up.shape[0], rank, 1, 1),
                                             scale, kind, conv)
    # every other adapter: the exact dense difference, computed by the host's own code
    base = weight.detach().to(torch.float32)
    patched = host.calculate_weight([(1.0, patch, 1.0, None, None)], base.clone(), key)
    diff = (patched - base)
    if param == "weight":
        return module_path, DenseDelta(diff, None, kind, conv)
    return module_path, DenseDelta(None, diff, kind, conv)


class MultiLoraRuntime:
    """Per-clone state of a switch or composite run; see the module docstring."""

    def __init__(self, method: str, loras: list[MappedLora], switch_interval: int = 5):
        self.method = method
        self.loras = loras
        self.switch_interval = switch_interval
        self.routing: Routing | None = None
        self.trace: RunTrace | None = None
        self.last_trace: RunTrace | None = None
        self._layers: dict[str, RoutedLayer] | None = None
        self._handles: list = []
        self._base_model = None
        self._saved: dict[str, torch.nn.Parameter] = {}
        self._folded: int | None = None
        self._schedule_src = None
        self._schedule: list[float] = []

    # ---------------------------------------------------------------- installation
    def attach(self, clone) -> None:
        clone.add_wrapper_with_key(host.WrappersMP.OUTER_SAMPLE, KEY, self.outer_sample)
        clone.add_wrapper_with_key(host.WrappersMP.DIFFUSION_MODEL, KEY, self.diffusion_model)
        if self.method != "switch":
            clone.set_injections(KEY, [host.PatcherInjection(self.inject, self.eject)])
        clone.set_attachments(KEY, self)

    def inject(self, model_patcher) -> None:
        base = model_patcher.model
        if self._layers is None or self._base_model is not base:
            self._layers = self._build_layers(base)
            self._base_model = base
        for path, layer in self._layers.items():
            module = host.get_attr(base, path)
            self._handles.append(module.register_forward_hook(layer))

    def eject(self, model_patcher) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _build_layers(self, base) -> dict[str, RoutedLayer]:
        per_module: dict[str, dict[int, object]] = {}
        for i, ml in enumerate(self.loras):
            for key, patch in ml.patches.items():
                if not isinstance(key, str):
                    raise CMLoRAError("CMLoRA Apply", "method",
                                      f"LoRA '{ml.entry.name}' patches a fused layer ({key[0]}) that routing cannot split.",
                                      "use method 'merge' for this model.")
                path, delta = build_delta(base, key, patch)
                slot = per_module.setdefault(path, {})
                if i in slot:  # weight and bias of one layer: add both
                    first = slot[i]
                    slot[i] = _Sum(first, delta)
                else:
                    slot[i] = delta
        return {path: RoutedLayer(path, deltas, self) for path, deltas in per_module.items()}

    # ---------------------------------------------------------------- wrappers
    def outer_sample(self, executor, *args, **kwargs):
        guider = executor.class_obj
        self._base_model = guider.model_patcher.model
        self.trace = RunTrace(self.method)
        started = time.perf_counter()
        try:
            out = executor(*args, **kwargs)
            self.trace.status = "finished"
            return out
        except BaseException as e:
            self.trace.status = f"stopped ({type(e).__name__})"
            raise
        finally:
            self.routing = None
            self._unfold()
            self.trace.seconds = time.perf_counter() - started
            self.last_trace, self.trace = self.trace, None
            log.info("CMLoRA %s: %s", self.method, self.describe_trace(self.last_trace))

    def diffusion_model(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        to = transformer_options
        if "sample_sigmas" not in to:
            raise CMLoRAError("CMLoRA Apply", "model",
                              "the sampler did not pass its sigma schedule to the model, so the step is unknown.",
                              "sample with KSampler, KSamplerAdvanced or SamplerCustomAdvanced.")
        schedule = self._schedule_points(to["sample_sigmas"])
        step = step_index(schedule, to["sigmas"])
        trace = self.trace or RunTrace(self.method)
        trace.steps = num_steps(schedule)
        trace.model_calls += 1
        host.throw_if_interrupted()
        if self.method == "switch":
            k = switch_active(step, self.switch_interval, len(self.loras))
            trace.active[step] = k
            self._fold(k)
            trace.call_rows.append(x.shape[0])
            return executor(x, timesteps, context, y, control, to, **kwargs)
        return self._routed_call(executor, trace, composite_weights(len(self.loras)),
                                 x, timesteps, context, y, control, to, **kwargs)

    def _schedule_points(self, sample_sigmas) -> list[float]:
        """The run's sigma schedule as floats, read from the device once per run."""
        if self._schedule_src is not sample_sigmas:
            self._schedule_src, self._schedule = sample_sigmas, sample_sigmas.reshape(-1).tolist()
        return self._schedule

    def _routed_call(self, executor, trace, weights, x, timesteps, context, y, control, to, **kwargs):
        """One forward with the batch repeated once per LoRA, rows routed, outputs combined."""
        batch, copies = x.shape[0], len(self.loras)
        rep = lambda v: repeat_rows(v, batch, copies)  # noqa: E731
        to2 = dict(to)
        to2["cond_or_uncond"] = list(to.get("cond_or_uncond", [])) * copies
        to2["uuids"] = list(to.get("uuids", [])) * copies
        self.routing = Routing.blocks(batch, [(i, ml.entry.strength_model) for i, ml in enumerate(self.loras)])
        trace.call_rows.append(batch * copies)
        try:
            out = executor(rep(x), rep(timesteps), rep(context), rep(y), rep(control), to2,
                           **{k: rep(v) for k, v in kwargs.items()})
        finally:
            self.routing = None
        return combine_copies(out, weights)

    # ---------------------------------------------------------------- folding (switch)
    def _fold(self, k: int) -> None:
        if self._folded == k:
            return
        base = self._base_model
        self._unfold()
        ml = self.loras[k]
        for key, patch in ml.patches.items():
            weight, set_func, convert_func = host.get_key_weight(base, key)
            if set_func is not None or convert_func is not None:
                raise CMLoRAError("CMLoRA Apply", "method",
                                  f"layer {key} stores quantized weights that switch cannot refold.",
                                  "use method 'composite' or 'merge' with this model.")
            self._saved[key] = weight
            temp = weight.detach().to(torch.float32, copy=True)
            merged = host.calculate_weight([(ml.entry.strength_model, patch, 1.0, None, None)], temp, key)
            merged = host.stochastic_rounding(merged, weight.dtype, seed=host.string_to_seed(key))
            host.set_attr_param(base, key, merged)
        self._folded = k
        if self.trace is not None:
            self.trace.folds += 1

    def _unfold(self) -> None:
        for key, original in self._saved.items():
            host.set_attr(self._base_model, key, original)
        self._saved.clear()
        self._folded = None

    # ---------------------------------------------------------------- reports
    def describe_trace(self, trace: RunTrace | None) -> str:
        if trace is None:
            return "not run yet"
        text = (f"{trace.status}, {trace.steps} steps, {trace.model_calls} diffusion-model calls, "
                f"{len(self.loras)} LoRAs, {trace.seconds:.2f}s")
        if self.method == "switch":
            order = [trace.active[s] for s in sorted(trace.active)]
            text += f", {trace.folds} refolds, active LoRA per step: {order}"
        else:
            text += f", rows per call: {sorted(set(trace.call_rows))}"
        return text


class _Sum:
    """Two deltas on one layer (a LoRA patching both weight and bias)."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def __call__(self, x):
        return self.a(x) + self.b(x)


def apply_method(model, loras: list[MappedLora], method: str, switch_interval: int, node: str):
    """A clone of ``model`` that composes ``loras`` with ``method``; ``model`` is untouched."""
    clone = model.clone()
    if method == "merge":
        for ml in loras:
            clone.add_patches(ml.patches, ml.entry.strength_model)
        return clone
    if method in ("switch", "composite"):
        if method == "switch" and switch_interval < 1:
            raise CMLoRAError(node, "switch_interval", "must be at least 1.", "set switch_interval to 1 or more.")
        MultiLoraRuntime(method, loras, switch_interval).attach(clone)
        return clone
    if method == "cmlora":
        raise CMLoRAError(node, "method",
                          "method 'cmlora' needs a frequency schedule (LoRA Profiler -> Frequency Scheduler), "
                          "which this version of the pack does not ship yet.",
                          "choose 'switch' or 'composite' for now.")
    raise CMLoRAError(node, "method", f"unknown method {method!r}.", f"choose one of {', '.join(METHODS)}.")
