"""Forward-additive LoRA deltas routed per batch row, and batch expansion helpers.

A routed layer computes y = base(x) + sum_k w_k * delta_k(x) where each delta only sees
the rows routed to LoRA k. Rows of one model call are grouped in contiguous blocks (one
per LoRA copy of the batch), so each delta runs once per block on a slice: no gathers,
and a LoRA with no rows costs nothing.

A delta may cover only a slice of the layer's outputs: DiT models fuse projections into one
layer (Flux's ``qkv``, and ``linear1`` = q, k, v and the MLP input), and a LoRA trained on
the separate projections patches a slice of the fused weight's rows. Such a delta computes
only its slice and is added there (``Delta.out``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class Delta:
    """The change one LoRA makes to one layer, applied to the layer's input."""

    def __init__(self, kind: str, conv: dict | None = None, out: tuple[int, int] | None = None):
        self.kind = kind  # "linear" | "conv"
        self.conv = conv or {}
        self.out = out  # (first, count) of the layer's output features it changes; None: all
        self._cast: dict = {}
        self.weights = 0  # elements of its matrices: each input position costs 2 * weights FLOPs

    def flops(self, rows: int, x_shape, out_shape) -> int:
        """FLOPs of this delta's matrix products on ``rows`` rows of a layer whose input and output
        have these shapes (a multiply-add counts 2, as torch's FLOP counter counts it): 2 * weights
        per input position of a linear layer (a token), per output position of a convolution."""
        if self.kind == "linear":
            positions = rows * math.prod(x_shape[1:-1])
        else:
            positions = rows * out_shape[-2] * out_shape[-1]
        return 2 * positions * self.weights

    def index(self, start: int, stop: int) -> tuple:
        """Where this delta's output goes in the layer's output, rows start..stop."""
        rows = slice(start, stop)
        if self.out is None:
            return (rows,)
        features = slice(self.out[0], self.out[0] + self.out[1])
        return (rows, Ellipsis, features) if self.kind == "linear" else (rows, features)

    def _tensors(self) -> tuple:
        raise NotImplementedError

    def cast(self, device, dtype) -> tuple:
        # Outside inference mode (autograd for CLoRA's latent updates) tensors created under the
        # host's inference mode cannot be saved for backward: keep a plain copy for that case.
        plain = not torch.is_inference_mode_enabled()
        key = (device, dtype, plain)
        hit = self._cast.get(key)
        if hit is None:
            hit = tuple(None if t is None else t.to(device=device, dtype=dtype) for t in self._tensors())
            if plain:
                hit = tuple(t.clone() if t is not None and t.is_inference() else t for t in hit)
            self._cast[key] = hit
        return hit

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LowRankDelta(Delta):
    """delta(x) = scale * up(down(x)); down is (r, in[, kh, kw]), up is (out, r[, 1, 1]).

    Exactly the host's merged ``W + scale * up @ down`` applied to x, at rank-r cost.
    """

    def __init__(self, down: torch.Tensor, up: torch.Tensor, scale: float, kind: str, conv: dict | None = None,
                 out: tuple[int, int] | None = None):
        super().__init__(kind, conv, out)
        self.down, self.up, self.scale = down, up, float(scale)
        self.rank = down.shape[0]
        self.weights = down.numel() + up.numel()

    def _tensors(self):
        return (self.down, self.up)

    def __call__(self, x):
        down, up = self.cast(x.device, x.dtype)
        if self.kind == "linear":
            h = F.linear(x, down)
            return F.linear(h, up) * self.scale
        h = F.conv2d(x, down, None, self.conv.get("stride", 1), self.conv.get("padding", 0),
                     self.conv.get("dilation", 1))
        return F.conv2d(h, up) * self.scale


class DenseDelta(Delta):
    """delta(x) = layer(x; dW, db): a full-shape weight difference (LoHa, LoKr, DoRA, diffs).

    dW = W_patched - W is computed once by the host's own adapter code, so every format the
    host can merge is also exact here.
    """

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, kind: str, conv: dict | None = None,
                 out: tuple[int, int] | None = None):
        super().__init__(kind, conv, out)
        self.weight, self.bias = weight, bias
        self.weights = 0 if weight is None else weight.numel()  # a bias alone is an addition

    def _tensors(self):
        return (self.weight, self.bias)

    def __call__(self, x):
        w, b = self.cast(x.device, x.dtype)
        if w is None:
            shape = [1] * x.ndim
            shape[-1 if self.kind == "linear" else 1] = -1
            return b.reshape(shape)  # broadcasts over the rows it is added to
        if self.kind == "linear":
            return F.linear(x, w, b)
        return F.conv2d(x, w, b, self.conv.get("stride", 1), self.conv.get("padding", 0),
                        self.conv.get("dilation", 1), self.conv.get("groups", 1))


@dataclass(frozen=True)
class Route:
    """Rows [start, stop) of the current model call get LoRA ``lora`` at weight ``weight``."""

    lora: int
    start: int
    stop: int
    weight: float


@dataclass(frozen=True)
class Routing:
    """The routing table of one model call: ``rows`` rows, a list of routes."""

    rows: int
    routes: tuple[Route, ...]

    @staticmethod
    def blocks(batch: int, weights: list[tuple[int, float]]) -> "Routing":
        """Copy k of a batch (rows k*batch .. (k+1)*batch) gets the k-th (lora, weight)."""
        routes = tuple(Route(lora, k * batch, (k + 1) * batch, w) for k, (lora, w) in enumerate(weights))
        return Routing(batch * len(weights), routes)


class RoutedLayer:
    """Forward hook for one layer: adds the routed LoRAs' deltas to its output.

    ``deltas`` maps LoRA index -> the Delta, or list of Deltas (weight and bias, or slices of a
    fused layer), one LoRA makes on this layer; ``state.routing`` is the table of the model
    call in progress, or None outside this pack's runs (then the hook does nothing, so a plain
    sampler on the same model is unaffected even while the hook is installed). ``state.products``,
    when not None (Compare Methods' runs), is a one-element list that adds up the FLOPs of the
    deltas' matrix products.
    """

    def __init__(self, name: str, deltas: dict, state):
        self.name, self.state = name, state
        self.deltas = {i: list(d) if isinstance(d, (list, tuple)) else [d] for i, d in deltas.items()}

    def __call__(self, module, args, output):
        routing: Routing | None = self.state.routing
        if routing is None:
            return None
        x = args[0]
        if x.shape[0] != routing.rows:
            raise RuntimeError(
                f"CMLoRA routing: layer {self.name} got {x.shape[0]} rows but the model call has "
                f"{routing.rows}; another patch changed the batch inside the model.")
        grad = torch.is_grad_enabled() and (output.requires_grad or x.requires_grad)
        out = output.clone() if grad else output
        products = self.state.products
        for r in routing.routes:
            if r.weight == 0.0:
                continue
            for delta in self.deltas.get(r.lora, ()):
                d = delta(x[r.start:r.stop])
                if products is not None:
                    products[0] += delta.flops(r.stop - r.start, x.shape, output.shape)
                at = delta.index(r.start, r.stop)
                if grad:
                    out[at] = out[at] + r.weight * d
                else:
                    out[at].add_(d, alpha=r.weight)
        return out


def repeat_rows(value, batch: int, copies: int):
    """Repeat every tensor whose first dimension is ``batch`` ``copies`` times along it.

    Lists, tuples and dicts are walked (ControlNet residuals come as dicts of lists);
    anything else is returned unchanged.
    """
    if copies == 1:
        return value
    if torch.is_tensor(value):
        if value.ndim > 0 and value.shape[0] == batch:
            return torch.cat([value] * copies, dim=0)
        return value
    if isinstance(value, list):
        return [repeat_rows(v, batch, copies) for v in value]
    if isinstance(value, tuple):
        return tuple(repeat_rows(v, batch, copies) for v in value)
    if isinstance(value, dict):
        return {k: repeat_rows(v, batch, copies) for k, v in value.items()}
    return value


def combine_copies(output: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Weighted sum over the copies of a batch: (K*B, ...) -> (B, ...), sum_k weights[k]*out_k.

    ``weights`` are used as given (normalise them before calling).
    """
    k = len(weights)
    out = output.reshape(k, output.shape[0] // k, *output.shape[1:])
    w = torch.tensor(weights, dtype=output.dtype, device=output.device).reshape(k, *([1] * (out.ndim - 1)))
    return (out * w).sum(0)
