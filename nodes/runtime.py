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

Clones. The runtime is the patcher's attachment; cloning the patcher gives the clone a
runtime of its own (``on_model_patcher_clone``: same LoRAs and settings, the built deltas
shared, no per-run state shared). Wrappers, injections and patches registered on the
patcher are plain functions that find the runtime of the patcher being sampled — through
the patcher, or through the run's ``transformer_options`` where the host passes no
patcher — never a bound method of the runtime that happened to register them: hosts copy
those entries between clones differently (deep copies on some versions, shared objects on
others).

Weights the pack must not write. Switch folds only where the weights are plain float
tensors that the classic patcher holds. Where the host manages weights per forward
(dynamic VRAM) or stores them quantized (fp8 scaled, GGUF, ...), switch routes the active
LoRA to every row in the forward instead, as composite does, and never touches the weights.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

import torch

from ..cmlora_core.errors import CMLoRAError
from ..cmlora_core.routing import DenseDelta, LowRankDelta, RoutedLayer, Routing, combine_copies, repeat_rows
from ..cmlora_core.cmlora import REUSE, SHALLOW, Planner, Schedule, validate_run
from ..cmlora_core.schedule import composite_weights, num_steps, step_index, switch_active
from ..cmlora_core.spectrum import batch_score
from . import host
from .loras import MappedLora
from .unet_split import capture_patch, find_split, shallow_forward, shallow_fraction

log = logging.getLogger("cmlora")

KEY = "cmlora"
METHODS = ("merge", "switch", "composite", "cmlora")


def runtime_of(transformer_options: dict, node: str = "CMLoRA Apply"):
    """The runtime of the run in progress (set by the OUTER_SAMPLE wrapper)."""
    runtime = transformer_options.get(KEY)
    if runtime is None:
        raise CMLoRAError(node, "model",
                          "the patched model was called outside a sampler run, so the step and the LoRAs are unknown.",
                          "sample it with KSampler, KSamplerAdvanced or SamplerCustomAdvanced.")
    return runtime


def _outer_sample(executor, *args, **kwargs):
    guider = executor.class_obj
    runtime = guider.model_patcher.get_attachment(KEY)
    guider.model_options.setdefault("transformer_options", {})[KEY] = runtime
    return runtime.outer_sample(executor, *args, **kwargs)


def _diffusion_model(executor, *args, **kwargs):
    to = kwargs["transformer_options"] if "transformer_options" in kwargs else args[5]
    return runtime_of(to).diffusion_model(executor, *args, **kwargs)


def _prepare_sampling(executor, model, noise_shape, *args, **kwargs):
    """Tell the host's memory estimate how many rows each model call really has."""
    factor = model.get_attachment(KEY).row_factor()
    return executor(model, [noise_shape[0] * factor, *noise_shape[1:]], *args, **kwargs)


def _calc_cond_batch(executor, model, *args, **kwargs):
    """While the host sizes its batches of conds, its estimate counts the copies of every row.

    Set on the base model for this call only (not as an object patch, which would stay on the
    model after the run and inflate the next plain run's estimate)."""
    runtime = runtime_of(kwargs["model_options"]["transformer_options"] if "model_options" in kwargs
                         else args[3]["transformer_options"])
    previous = model.__dict__.get("memory_required")  # another pack's object patch, if any
    model.memory_required = RowsScaled(model.memory_required, runtime.row_factor())
    try:
        return executor(model, *args, **kwargs)
    finally:
        if previous is None:
            del model.memory_required  # back to the class's method
        else:
            model.memory_required = previous


class _MergeFinite:
    """Merge's only wrapper: stops a run whose prediction turns NaN or infinite (plain data, so
    hosts may copy it between clones as they like)."""

    def __init__(self, node: str, names: list[str]):
        self.node, self.names = node, names

    def __call__(self, executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        if not out.is_meta and not bool(torch.isfinite(out).all()):
            raise CMLoRAError(self.node, "stack", f"the prediction holds NaN or infinite values with the merged LoRAs "
                              f"{self.names} (merge cannot tell which one).", _NONFINITE_FIX)
        return out


_NONFINITE_FIX = ("lower the LoRAs' strength_model (or cfg); if the base model alone does this, run it in fp32 "
                  "(--force-fp32) or with another sampler.")


def _inject(model_patcher):
    model_patcher.get_attachment(KEY).inject(model_patcher)


def _eject(model_patcher):
    model_patcher.get_attachment(KEY).eject(model_patcher)


def _observe_denoised(args):
    return runtime_of(args["model_options"]["transformer_options"]).observe_denoised(args)


class RowsScaled:
    """``memory_required`` of a model whose every call runs ``factor`` copies of its rows."""

    def __init__(self, original, factor: int):
        self.original, self.factor = original, factor

    def __call__(self, input_shape, *args, **kwargs):
        return self.original([input_shape[0] * self.factor, *input_shape[1:]], *args, **kwargs)


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
    routed: bool = False  # switch: the active LoRA was routed in the forward instead of folded
    full_passes: int = 0  # CMLoRA: LoRA evaluations per kind, summed over model calls
    shallow_passes: int = 0
    reused: int = 0
    shallow_fraction: float | None = None  # FLOPs of a shallow pass / a full pass
    switched_at: int | None = None  # online: first step of the low-frequency phase
    plans: dict = field(default_factory=dict)  # step -> StepPlan (cmlora)
    seconds: float = 0.0
    status: str = "running"


def _module_kind(module, node: str) -> tuple[str, dict]:
    # by the layer's attributes, not its class: the hosts' quantized layers are not torch's classes
    if len(getattr(module, "kernel_size", ())) == 2:
        return "conv", {"stride": module.stride, "padding": module.padding, "dilation": module.dilation,
                        "groups": module.groups}
    if hasattr(module, "in_features"):
        return "linear", {}
    raise CMLoRAError(node, "method",
                      f"layer type {type(module).__name__} cannot take a routed LoRA delta.",
                      "use method 'merge' for this model.")


def build_delta(base_model, key: str, patch, node: str = "CMLoRA Apply"):
    """The routed form of one host patch on one weight (or bias) key."""
    module_path, param = key.rsplit(".", 1)
    module = host.get_attr(base_model, module_path)
    kind, conv = _module_kind(module, node)
    factors = host.lora_factors(patch) if param == "weight" else None
    if factors is not None and factors.plain and conv.get("groups", 1) == 1:
        up, down = factors.up, factors.down
        rank = down.shape[0]
        scale = (factors.alpha / rank) if factors.alpha is not None else 1.0
        if kind == "linear":
            return module_path, LowRankDelta(down.reshape(rank, -1), up.reshape(up.shape[0], rank), scale, kind)
        kernel = host.get_attr(base_model, key).shape[1:]
        return module_path, LowRankDelta(down.reshape(rank, *kernel), up.reshape(up.shape[0], rank, 1, 1),
                                         scale, kind, conv)
    # every other adapter: the exact dense difference, computed by the host's own code
    diff = host.patch_difference(base_model, key, patch)
    if param == "weight":
        return module_path, DenseDelta(diff, None, kind, conv)
    return module_path, DenseDelta(None, diff, kind, conv)


class MultiLoraRuntime:
    """Per-clone state of a switch, composite or cmlora run; see the module docstring."""

    def __init__(self, method: str, loras: list[MappedLora], switch_interval: int = 5, schedule: Schedule | None = None):
        self.method = method
        self.schedule = schedule
        self.loras = loras
        self.switch_interval = switch_interval
        self.node = "CMLoRA Apply"  # the node that made this runtime, named in its errors
        self._deltas: dict = {}  # "base": the model, "layers": {layer path: {LoRA index: Delta}}; shared by clones
        self.last_trace: RunTrace | None = None
        self._reset()

    def _reset(self) -> None:
        """Fresh per-patcher and per-run state (also what a clone of the patcher starts with)."""
        self._planner: Planner | None = None
        self._split = None
        self._deep: dict = {}  # (lora, call key) -> deep feature of its last full pass
        self._pred: dict = {}  # (lora, call key) -> its last full prediction ("prediction" cache)
        self._probe = None  # one row of a model call, to count FLOPs after the run
        self.routing: Routing | None = None
        self.trace: RunTrace | None = None
        self._handles: list = []
        self._base_model = None
        self._saved: dict[str, torch.nn.Parameter] = {}
        self._folded: int | None = None
        self._route_switch = False
        self._schedule_src = None
        self._schedule: list[float] = []

    def on_model_patcher_clone(self):
        """The host calls this when the patcher is cloned: the clone gets its own runtime."""
        twin = copy.copy(self)
        twin.last_trace = None
        twin._reset()
        return twin

    # ---------------------------------------------------------------- installation
    def attach(self, clone, node: str = "CMLoRA Apply") -> None:
        if clone.get_attachment(KEY) is not None:
            raise CMLoRAError(node, "model",
                              "this model already composes a LoRA stack (from CMLoRA Apply, the CMLoRA Sampler or the "
                              "CLoRA Attention Masker); a second one on top would run inside the first.",
                              "put all LoRAs into one stack, or feed this node the model from before the first one.")
        self.node = node
        clone.add_wrapper_with_key(host.WrappersMP.OUTER_SAMPLE, KEY, _outer_sample)
        clone.add_wrapper_with_key(host.WrappersMP.DIFFUSION_MODEL, KEY, _diffusion_model)
        clone.set_injections(KEY, [host.PatcherInjection(_inject, _eject)])
        factor = self.row_factor()
        if factor > 1:  # the host's memory estimates learn that every model call runs `factor` copies
            clone.add_wrapper_with_key(host.WrappersMP.PREPARE_SAMPLING, KEY, _prepare_sampling)
            clone.add_wrapper_with_key(host.WrappersMP.CALC_COND_BATCH, KEY, _calc_cond_batch)
        if self.method == "cmlora" and self.schedule.settings.mode == "online":
            clone.set_model_sampler_post_cfg_function(_observe_denoised)
        clone.set_attachments(KEY, self)

    def row_factor(self) -> int:
        """The most copies of a model call's rows that one forward of this method runs."""
        return 1 if self.method == "switch" else len(self.loras)

    def inject(self, model_patcher) -> None:
        base = model_patcher.model
        self._base_model = base
        if self.method == "switch" and not self._switch_routes(model_patcher):
            return  # switch folds: no hooks on the model call's path
        for path, deltas in self._layer_deltas(base).items():
            module = host.get_attr(base, path)
            self._handles.append(module.register_forward_hook(RoutedLayer(path, deltas, self)))

    def eject(self, model_patcher) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _layer_deltas(self, base) -> dict[str, dict]:
        if self._deltas.get("base") is not base:
            self._deltas.update(base=base, layers=self._build_deltas(base))
        return self._deltas["layers"]

    def _build_deltas(self, base) -> dict[str, dict]:
        per_module: dict[str, dict[int, object]] = {}
        for i, ml in enumerate(self.loras):
            for key, patch in ml.patches.items():
                if not isinstance(key, str):
                    raise CMLoRAError(self.node, "method",
                                      f"LoRA '{ml.entry.name}' patches a fused layer ({key[0]}) that routing cannot split.",
                                      "use method 'merge' for this model.")
                path, delta = build_delta(base, key, patch, self.node)
                slot = per_module.setdefault(path, {})
                if i in slot:  # weight and bias of one layer: add both
                    first = slot[i]
                    slot[i] = _Sum(first, delta)
                else:
                    slot[i] = delta
        return per_module

    # ---------------------------------------------------------------- wrappers
    def outer_sample(self, executor, *args, **kwargs):
        guider = executor.class_obj
        self._base_model = guider.model_patcher.model
        if self.method == "switch":
            self._route_switch = self._switch_routes(guider.model_patcher)
        self.trace = RunTrace(self.method)
        self._planner, self._deep, self._pred, self._probe = None, {}, {}, None
        started = time.perf_counter()
        try:
            out = executor(*args, **kwargs)
            self.trace.status = "finished"
            if self._planner is not None:
                self.trace.switched_at = self._planner.switched_at
            if self.method == "cmlora" and self._probe is not None:
                self.trace.shallow_fraction = shallow_fraction(*self._probe)
            return out
        except BaseException as e:
            self.trace.status = f"stopped ({type(e).__name__})"
            raise
        finally:
            self.routing = None
            self._deep, self._pred, self._probe = {}, {}, None
            self._unfold()
            self.trace.seconds = time.perf_counter() - started
            self.last_trace, self.trace = self.trace, None
            log.info("CMLoRA %s: %s", self.method, self.describe_trace(self.last_trace))

    def diffusion_model(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        to = transformer_options
        if "sample_sigmas" not in to:
            raise CMLoRAError(self.node, "model",
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
            trace.call_rows.append(x.shape[0])
            if not self._route_switch:
                self._fold(k)
                return self._finite(executor(x, timesteps, context, y, control, to, **kwargs), [k], step)
            trace.routed = True
            self.routing = Routing.blocks(x.shape[0], [(k, self.loras[k].entry.strength_model)])
            try:
                return self._finite(executor(x, timesteps, context, y, control, to, **kwargs), [k], step)
            finally:
                self.routing = None
        if self.method == "cmlora":
            return self._cmlora_call(executor, trace, step, x, timesteps, context, y, control, to, kwargs)
        indices = list(range(len(self.loras)))
        out = self._forward_copies(executor, trace, indices, x, timesteps, context, y, control, to, kwargs)
        return combine_copies(self._finite(out, indices, step), composite_weights(len(self.loras)))

    def _finite(self, out: torch.Tensor, indices: list[int], step: int, labels: list[str] | None = None,
                blocks: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``out``, or a stop naming the LoRAs whose rows hold NaN or inf. One reduction per model call;
        only when it fails are the per-LoRA ``blocks`` looked at (default: ``out`` split into one block
        of rows per entry of ``indices``; ``labels`` names them, default "LoRA '<name>'")."""
        if out.is_meta or bool(torch.isfinite(out).all()):
            return out
        labels = labels or [f"LoRA '{self.loras[i].entry.name}'" for i in indices]
        blocks = blocks if blocks is not None else out.chunk(len(labels))
        bad = [label for label, o in zip(labels, blocks) if not bool(torch.isfinite(o).all())]
        who = (", ".join(bad) if len(bad) < len(labels) or len(labels) == 1
               else f"every row ({', '.join(bad)}), so the base model or the settings are the likelier cause")
        raise CMLoRAError(self.node, "stack", f"the prediction at step {step} holds NaN or infinite values from {who}.",
                          _NONFINITE_FIX)

    def _schedule_points(self, sample_sigmas) -> list[float]:
        """The run's sigma schedule as floats, read from the device once per run."""
        if self._schedule_src is not sample_sigmas:
            self._schedule_src, self._schedule = sample_sigmas, sample_sigmas.reshape(-1).tolist()
        return self._schedule

    def _copies(self, trace, indices, x, to):
        """Routing, a repeat function and transformer options for one copy of the batch per LoRA."""
        batch, copies = x.shape[0], len(indices)
        to2 = dict(to)
        to2["cond_or_uncond"] = list(to.get("cond_or_uncond", [])) * copies
        to2["uuids"] = list(to.get("uuids", [])) * copies
        trace.call_rows.append(batch * copies)
        routing = Routing.blocks(batch, [(i, self.loras[i].entry.strength_model) for i in indices])
        return routing, (lambda v: repeat_rows(v, batch, copies)), to2

    def _forward_copies(self, executor, trace, indices, x, timesteps, context, y, control, to, kwargs, capture=None):
        """One full forward, the batch repeated once per LoRA in ``indices``, rows routed.

        Returns the raw output (len(indices) * B rows, LoRA blocks in ``indices`` order);
        ``capture`` (a list) receives the deep feature of every row.
        """
        routing, rep, to2 = self._copies(trace, indices, x, to)
        if capture is not None:
            patches = {k: list(v) for k, v in to.get("patches", {}).items()}
            patches.setdefault("output_block_patch", []).append(capture_patch(self._split, capture))
            to2["patches"] = patches
        self.routing = routing
        try:
            return executor(rep(x), rep(timesteps), rep(context), rep(y), rep(control), to2,
                            **{k: rep(v) for k, v in kwargs.items()})
        finally:
            self.routing = None

    # ---------------------------------------------------------------- cmlora
    def _planner_for(self, total: int) -> Planner:
        if self._planner is None or self._planner.total != total:
            try:
                validate_run(self.schedule, total)
            except ValueError as e:
                raise CMLoRAError(self.node, "schedule", f"{e}.",
                                  "use at least 2 LoRAs and at least as many steps as LoRAs.") from e
            self._planner = Planner(self.schedule, total)
        return self._planner

    def _cmlora_call(self, executor, trace, step, x, timesteps, context, y, control, to, kwargs):
        """Dominant-weighted composite with full, shallow and reused LoRA passes (SPEC.md 2)."""
        unet = executor.class_obj
        planner = self._planner_for(trace.steps)
        plan = planner.plan(step)
        trace.plans[step] = plan
        cache = self.schedule.settings.cache
        if cache == "deep" and self._split is None:
            self._split = find_split(unet)
        if self._probe is None and cache == "deep":
            self._probe = (unet, self._split, x, timesteps, context, y)
        key = (tuple(to.get("uuids", [])), x.shape[0])
        full, shallow, reuse = [], [], []
        for i, kind in enumerate(plan.passes):
            if kind == SHALLOW and (i, key) in self._deep:
                shallow.append(i)
            elif kind == REUSE and (i, key) in self._pred:
                reuse.append(i)
            else:  # FULL, or nothing cached for this call yet
                full.append(i)
        outs = {}
        if full:
            sink = [] if cache == "deep" else None
            out = self._forward_copies(executor, trace, full, x, timesteps, context, y, control, to, kwargs, sink)
            for i, o, d in zip(full, out.chunk(len(full)), sink[0].chunk(len(full)) if sink else [None] * len(full)):
                outs[i] = o
                if d is not None:
                    self._deep[(i, key)] = d
                if cache == "prediction":
                    self._pred[(i, key)] = o
        if shallow:
            routing, rep, to2 = self._copies(trace, shallow, x, to)
            deep = torch.cat([self._deep[(i, key)] for i in shallow])
            self.routing = routing
            try:
                out = shallow_forward(unet, self._split, rep(x), rep(timesteps), rep(context), rep(y), deep, to2)
            finally:
                self.routing = None
            outs.update(zip(shallow, out.chunk(len(shallow))))
        for i in reuse:
            outs[i] = self._pred[(i, key)]
        trace.full_passes += len(full)
        trace.shallow_passes += len(shallow)
        trace.reused += len(reuse)
        indices = list(range(len(self.loras)))
        mixed = sum(w * outs[i] for i, w in enumerate(plan.weights))
        return self._finite(mixed, indices, step, blocks=[outs[i] for i in indices])

    def observe_denoised(self, args):
        """Post-CFG hook (online mode): tell the planner how much high frequency x0 still has."""
        denoised = args["denoised"]
        if self._planner is not None and self._schedule:
            step = step_index(self._schedule, args["sigma"])
            self._planner.observe(step, batch_score(denoised.detach().float().cpu()))
        return denoised

    # ---------------------------------------------------------------- folding (switch)
    def _switch_routes(self, model_patcher) -> bool:
        """Switch routes the active LoRA in the forward where the pack must not write the weights."""
        keys = [key for ml in self.loras for key in ml.patches if isinstance(key, str)]
        return not host.weights_writable(model_patcher, keys)

    def _fold(self, k: int) -> None:
        if self._folded == k:
            return
        base = self._base_model
        self._unfold()
        ml = self.loras[k]
        for key, patch in ml.patches.items():  # plain float weights: see _switch_routes
            self._saved[key] = host.fold_patch(base, key, patch, ml.entry.strength_model)
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
            how = ("routed in the forward (the host owns these weights)" if trace.routed
                   else f"{trace.folds} refolds")
            text += f", {how}, active LoRA per step: {order}"
        elif self.method == "cmlora":
            text += (f", passes: {trace.full_passes} full, {trace.shallow_passes} shallow, {trace.reused} reused"
                     f" ({self.schedule.settings.mode}, cache {self.schedule.settings.cache})")
            if self.schedule.settings.mode == "online":
                text += (f"; switched to the low-frequency LoRAs at step {trace.switched_at}"
                         if trace.switched_at is not None else "; never switched to the low-frequency LoRAs")
            ratio = self.flop_ratio(trace)
            if ratio is not None:
                if trace.shallow_fraction is not None:
                    text += f"; a shallow pass costs {trace.shallow_fraction:.3f} of a full pass"
                text += (f"; this run took {ratio:.3f}x the UNet FLOPs of merge "
                         f"(composite: {len(self.loras)}x)")
        else:
            text += f", rows per call: {sorted(set(trace.call_rows))}"
        return text

    @staticmethod
    def flop_ratio(trace: RunTrace) -> float | None:
        """UNet FLOPs of the run over merge's (one full pass per model call); LoRA deltas not counted."""
        if not trace.model_calls:
            return None
        f = trace.shallow_fraction if trace.shallow_fraction is not None else 0.0
        return (trace.full_passes + f * trace.shallow_passes) / trace.model_calls


class _Sum:
    """Two deltas on one layer (a LoRA patching both weight and bias)."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def __call__(self, x):
        return self.a(x) + self.b(x)


def apply_method(model, loras: list[MappedLora], method: str, switch_interval: int, node: str,
                 schedule: Schedule | None = None):
    """A clone of ``model`` that composes ``loras`` with ``method``; ``model`` is untouched."""
    clone = model.clone()
    if method == "merge":
        for ml in loras:
            clone.add_patches(ml.patches, ml.entry.strength_model)
        clone.add_wrapper_with_key(host.WrappersMP.DIFFUSION_MODEL, KEY,
                                   _MergeFinite(node, [ml.entry.name for ml in loras]))
        return clone
    if method in ("switch", "composite"):
        if method == "switch" and switch_interval < 1:
            raise CMLoRAError(node, "switch_interval", "must be at least 1.", "set switch_interval to 1 or more.")
        MultiLoraRuntime(method, loras, switch_interval).attach(clone, node)
        return clone
    if method == "cmlora":
        if schedule is None:
            raise CMLoRAError(node, "schedule", "method 'cmlora' needs a schedule.",
                              "connect a 'CMLoRA Frequency Scheduler' (fed by a 'CMLoRA LoRA Profiler', or by the stack).")
        names = tuple(ml.entry.name for ml in loras)
        if tuple(schedule.names) != names:
            raise CMLoRAError(node, "schedule",
                              f"the schedule was made for the LoRAs {list(schedule.names)}, but this stack composes "
                              f"{list(names)}.", "rebuild the schedule from this stack (re-run the profiler/scheduler).")
        if len(loras) < 2:
            raise CMLoRAError(node, "stack", "CMLoRA composes at least 2 LoRAs; the stack has 1 active LoRA.",
                              "add LoRAs, or use method 'merge' for a single LoRA.")
        MultiLoraRuntime(method, loras, switch_interval, schedule).attach(clone, node)
        return clone
    raise CMLoRAError(node, "method", f"unknown method {method!r}.", f"choose one of {', '.join(METHODS)}.")
