"""Routed LoRAs: the component every composing method shares.

A routed LoRA is added in the forward pass instead of folded into the weights: a forward
hook on each patched layer adds ``weight * delta(x)`` to the rows the model call's routing
table gives to that LoRA. So one forward can run N copies of a batch, each copy with its
own LoRA (composite, CMLoRA, CLoRA's branches), or every row with one LoRA (switch where
the pack must not write the weights). Outside a routed call the table is None and the
hooks change nothing, bit for bit.

``ModelCall`` is one call of the host's diffusion model (the arguments of its
``DIFFUSION_MODEL`` wrapper); ``RoutedLoras`` holds the deltas per layer, installs and
removes the hooks, and runs a call as copies of its rows with a routing table.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass

import torch

from ..cmlora_core.errors import CMLoRAError
from ..cmlora_core.routing import DenseDelta, LowRankDelta, Route, RoutedLayer, Routing, repeat_rows
from . import host
from .loras import MappedLora


_SIGNATURES: dict = {}


def _parameters(function) -> tuple[str, ...]:
    """The names of a diffusion model's forward parameters (``**kwargs`` excluded), by function."""
    f = getattr(function, "__func__", function)
    names = _SIGNATURES.get(f)
    if names is None:
        names = _SIGNATURES[f] = tuple(
            p.name for p in inspect.signature(function).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    return names


@dataclass
class ModelCall:
    """The arguments of one diffusion-model call, as the host's wrapper receives them.

    Every model family names them its own way (a UNet: x, timesteps, context, y, control,
    transformer_options; Flux: x, timestep, context, y, guidance, ref_latents, control,
    transformer_options; others take the options as a keyword): ``values`` holds them by name,
    ``positional`` says how many came by position, so ``run`` passes them on as received."""

    values: dict
    positional: tuple[str, ...]

    @classmethod
    def of(cls, executor, args: tuple, kwargs: dict) -> "ModelCall":
        names = _parameters(executor.original)
        if len(args) > len(names):
            raise TypeError(f"the diffusion model got {len(args)} positional arguments for its {len(names)} parameters")
        return cls({**dict(zip(names, args)), **kwargs}, names[:len(args)])

    @property
    def x(self) -> torch.Tensor:
        return self.values[self.positional[0]] if self.positional else self.values["x"]

    @property
    def timesteps(self) -> torch.Tensor:
        return self.values["timesteps"] if "timesteps" in self.values else self.values["timestep"]

    @property
    def context(self) -> torch.Tensor | None:
        return self.values.get("context")

    @property
    def y(self) -> torch.Tensor | None:
        return self.values.get("y")

    @property
    def control(self):
        return self.values.get("control")

    @property
    def options(self) -> dict:  # transformer_options
        return self.values.get("transformer_options") or {}

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    def replaced(self, **values) -> "ModelCall":
        """The call with some arguments replaced (by name; ``options`` for transformer_options)."""
        if "options" in values:
            values["transformer_options"] = values.pop("options")
        if "x" in values and self.positional and self.positional[0] != "x":
            values[self.positional[0]] = values.pop("x")
        return ModelCall({**self.values, **values}, self.positional)

    def run(self, executor) -> torch.Tensor:
        return executor(*(self.values[k] for k in self.positional),
                        **{k: v for k, v in self.values.items() if k not in self.positional})

    def copies(self, n: int, context: torch.Tensor | None = None) -> "ModelCall":
        """The call with its rows repeated ``n`` times (copy k is rows k*B .. (k+1)*B): every
        per-row tensor (latent, timesteps, prompt, guidance, ControlNet residuals, ...) and the
        options' per-row lists. ``context`` replaces the repeated prompt (CLoRA's branch prompts)."""
        b = self.rows
        options = dict(self.options)
        if n == 1:  # still a call of its own: the forward pops ControlNet's residual lists
            return self.replaced(control=own_lists(self.control), options=options)
        options["cond_or_uncond"] = list(self.options.get("cond_or_uncond", [])) * n
        options["uuids"] = list(self.options.get("uuids", [])) * n
        values = {k: (options if k == "transformer_options" else repeat_rows(v, b, n)) for k, v in self.values.items()}
        if context is not None:
            values["context"] = context
        return ModelCall(values, self.positional)


def own_lists(value):
    """New lists and dicts around the same tensors (a forward pops ControlNet's residual lists)."""
    if isinstance(value, list):
        return [own_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: own_lists(v) for k, v in value.items()}
    return value


def _kind(module) -> str | None:
    """'conv' (2-D), 'linear', or None for a layer a routed delta cannot be added to; by the layer's
    attributes, not its class: the hosts' quantized layers are not torch's classes."""
    if len(getattr(module, "kernel_size", ())) == 2:
        return "conv"
    return "linear" if hasattr(module, "in_features") else None


def _module_kind(module, node: str) -> tuple[str, dict]:
    kind = _kind(module)
    if kind == "conv":
        return "conv", {"stride": module.stride, "padding": module.padding, "dilation": module.dilation,
                        "groups": module.groups}
    if kind == "linear":
        return "linear", {}
    raise CMLoRAError(node, "method", f"layer type {type(module).__name__} cannot take a routed LoRA delta.",
                      "use method 'merge' for this model.")


def routing_problem(base_model, key) -> str | None:
    """Why the patch on ``key`` cannot be routed in the forward (only the host's weight merge can apply
    it), or None."""
    name, offset, function = host.patch_key(key)
    if function is not None:
        return f"patches {name} through a conversion function, which only the host's weight merge applies"
    if offset is not None and offset[0] != 0:
        return (f"patches a slice of {name} along its dimension {offset[0]}; routing adds deltas to slices of a "
                "layer's outputs only")
    module = host.get_attr(base_model, name.rsplit(".", 1)[0])
    if _kind(module) is None:
        return f"patches a {type(module).__name__} layer ({name}), which cannot take a routed delta"
    return None


def routing_fix(method: str, scheduled: bool) -> str:
    """What to do about a LoRA that cannot be routed, worded for the method in use."""
    if method == "CLoRA":
        return ("load it with LoraLoader before this node (it then acts on every branch), or leave it out of "
                "the stack")
    if method == "merge" and scheduled:
        return ("remove its step range and strength curve (merge then folds it into the weights as LoraLoader "
                "does), or load it with LoraLoader before this node")
    return "use method 'merge' without a step range for this LoRA, or load it with LoraLoader before this node"


def check_routable(base_model, loras: list[MappedLora], node: str, method: str, input: str = "method") -> None:
    """Refuse, before any sampling, a LoRA the routed path cannot apply (``method``: the method's name, or
    the node's for CLoRA, whose LoRAs come in on ``input`` 'stack')."""
    who = f"method '{method}'" if input == "method" else method
    for ml in loras:
        for key in ml.patches:
            problem = routing_problem(base_model, key)
            if problem is not None:
                raise CMLoRAError(node, input, f"LoRA '{ml.entry.name}' {problem}, so {who} cannot route it in "
                                  "the forward.", routing_fix(method, ml.entry.scheduled) + ".")


def build_delta(base_model, key, patch, node: str, lora: str):
    """The routed form of one host patch on one weight (or bias), whole or a slice of its output
    rows: (layer path, delta). ``check_routable`` has refused what cannot be routed."""
    name, offset, function = host.patch_key(key)
    problem = routing_problem(base_model, key)
    if problem is not None:
        raise CMLoRAError(node, "method", f"LoRA '{lora}' {problem}.", routing_fix("", False) + ".")
    out = None if offset is None else (int(offset[1]), int(offset[2]))
    module_path, param = name.rsplit(".", 1)
    module = host.get_attr(base_model, module_path)
    kind, conv = _module_kind(module, node)
    factors = host.lora_factors(patch) if param == "weight" else None
    if factors is not None and factors.plain and conv.get("groups", 1) == 1:
        up, down = factors.up, factors.down
        rank = down.shape[0]
        scale = (factors.alpha / rank) if factors.alpha is not None else 1.0
        if kind == "linear":
            return module_path, LowRankDelta(down.reshape(rank, -1), up.reshape(up.shape[0], rank), scale, kind,
                                             out=out)
        kernel = host.get_attr(base_model, name).shape[1:]
        return module_path, LowRankDelta(down.reshape(rank, *kernel), up.reshape(up.shape[0], rank, 1, 1),
                                         scale, kind, conv, out=out)
    # every other adapter: the exact dense difference, computed by the host's own code
    diff = host.patch_difference(base_model, name, patch, out)
    if param == "weight":
        return module_path, DenseDelta(diff, None, kind, conv, out=out)
    return module_path, DenseDelta(None, diff, kind, conv, out=out)


class RoutedLoras:
    """The LoRAs of one runtime as routed deltas on one model.

    ``routing`` is the table of the model call in progress (None between calls); the hooks
    read it. Deltas are built once per base model and shared with the copies made for the
    patcher's clones (``for_clone``), which install hooks of their own.
    """

    def __init__(self, loras: list[MappedLora], node: str):
        self.loras, self.node = loras, node
        self.routing: Routing | None = None
        # the model strength of every LoRA at the step in progress (set by the runtime per model
        # call; the stack strengths when no LoRA has a step range or curve)
        self.strengths: list[float] = [ml.entry.strength_model for ml in loras]
        # Compare Methods sets a one-element list here to add up the FLOPs of the deltas' products
        # (shared with the clones' copies); None: not counted
        self.products: list[int] | None = None
        self._built: dict = {}  # "base": the model, "layers": {layer path: {LoRA index: Delta}}
        self._handles: list = []

    def for_clone(self) -> "RoutedLoras":
        twin = copy.copy(self)
        twin.routing, twin._handles = None, []
        twin.strengths = list(self.strengths)
        return twin

    # ------------------------------------------------------------------ hooks
    def install(self, base_model) -> None:
        for path, deltas in self.layer_deltas(base_model).items():
            module = host.get_attr(base_model, path)
            self._handles.append(module.register_forward_hook(RoutedLayer(path, deltas, self)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def layer_deltas(self, base_model) -> dict[str, dict]:
        if self._built.get("base") is not base_model:
            self._built.update(base=base_model, layers=self._build(base_model))
        return self._built["layers"]

    def _build(self, base_model) -> dict[str, dict]:
        per_layer: dict[str, dict[int, list]] = {}
        for i, ml in enumerate(self.loras):
            for key, patch in ml.patches.items():
                path, delta = build_delta(base_model, key, patch, self.node, ml.entry.name)
                # a LoRA's deltas on one layer: its weight and bias, or slices of a fused layer
                per_layer.setdefault(path, {}).setdefault(i, []).append(delta)
        return per_layer

    # ------------------------------------------------------------------ routing
    def blocks(self, rows: int, indices: list[int]) -> Routing:
        """Copy k of ``rows`` rows gets LoRA ``indices[k]`` at its strength for the step."""
        return Routing.blocks(rows, [(i, self.strengths[i]) for i in indices])

    def together(self, rows: int, indices: list[int]) -> Routing:
        """Every row gets all LoRAs in ``indices`` at their strengths for the step (a merge in the forward)."""
        return Routing(rows, tuple(Route(i, 0, rows, self.strengths[i]) for i in indices))

    @contextlib.contextmanager
    def routed(self, routing: Routing):
        """Route the model calls made inside the block; cleared after, whatever happens."""
        self.routing = routing
        try:
            yield
        finally:
            self.routing = None

    def forward(self, executor, call: ModelCall, indices: list[int]) -> torch.Tensor:
        """One forward of the call's rows repeated once per LoRA in ``indices``, copy k with LoRA
        ``indices[k]``; the output holds len(indices) blocks of rows in that order."""
        with self.routed(self.blocks(call.rows, indices)):
            return call.copies(len(indices)).run(executor)
