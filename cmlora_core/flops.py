"""Exact FLOP counting of PyTorch code, fast enough for whole sampling runs on the meta device
(used by the CMLoRA runtime for its report and by the benchmark for its tables).

Counts what ``torch.utils.flop_counter.FlopCounterMode`` counts — one multiply-add is two
FLOPs; matrix products, convolutions and attention are counted, element-wise work is not —
with the same per-operator formulas, so both give the same totals (tests/core checks it).
It is faster for two reasons, both only on meta tensors, where nothing is computed:

* no module tracking (FlopCounterMode records a per-module breakdown we don't use);
* operators whose result shape is plain (element-wise, normalisation, linear, attention)
  get their result allocated directly instead of running the meta kernels of their
  decompositions, and linear/attention are counted with the formula of the operators
  they decompose into.

A whole 30-step SD1.5 run at 512x512 then takes seconds instead of minutes.
"""
from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

aten = torch.ops.aten

_SAME_SHAPE = {aten.silu.default, aten.gelu.default, aten.group_norm.default, aten.layer_norm.default,
               aten.dropout.default, aten.softmax.int, aten._safe_softmax.default,
               aten.silu_backward.default, aten.gelu_backward.default}
_BOOL_RESULT = {"eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_xor", "logical_not",
                "isnan", "isinf", "isfinite", "isneginf", "isposinf", "signbit"}
# size and stride queries must fall through to the tensor (as FlopCounterMode does)
_QUERIES = {aten.sym_is_contiguous.default, aten.is_contiguous.default, aten.is_contiguous.memory_format,
            aten.is_strides_like_format.default, aten.is_non_overlapping_and_dense.default, aten.size.default,
            aten.sym_size.default, aten.stride.default, aten.sym_stride.default, aten.storage_offset.default,
            aten.sym_storage_offset.default, aten.numel.default, aten.sym_numel.default, aten.dim.default,
            torch.ops.prim.layout.default}


def _meta(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "meta"


def _like(x: torch.Tensor, dtype=None) -> torch.Tensor:
    """``torch.empty_like(x, dtype=dtype)`` on meta: same layout rule (dense inputs keep their
    strides, others get dense strides in the same dimension order), twenty times faster."""
    dtype = x.dtype if dtype is None else dtype
    if x.is_contiguous():
        return torch.empty_strided(x.shape, x.stride(), dtype=dtype, device="meta")
    order = sorted(range(x.ndim), key=lambda d: x.stride(d))
    strides, step, dense = [0] * x.ndim, 1, True
    for d in order:
        if x.shape[d] != 1 and x.stride(d) != step:
            dense = False
        strides[d] = step
        step *= x.shape[d]
    return torch.empty_strided(x.shape, x.stride() if dense else strides, dtype=dtype, device="meta")


def _broadcast(*shapes) -> tuple:
    first = shapes[0]
    if all(s == first for s in shapes):
        return tuple(first)
    return tuple(torch.broadcast_shapes(*shapes))


def linear_flops(x_shape, w_shape) -> int:
    """F.linear: (..., in) x (out, in)^T — the bias add is element-wise and not counted."""
    return 2 * math.prod(x_shape[:-1]) * w_shape[1] * w_shape[0]


def attention_flops(q_shape, k_shape, v_shape) -> int:
    """softmax(q k^T) v: two batched matrix products (as the math backend decomposes it)."""
    batch = math.prod(q_shape[:-2])
    s_q, d = q_shape[-2], q_shape[-1]
    s_k, d_v = k_shape[-2], v_shape[-1]
    return 2 * batch * s_q * s_k * d + 2 * batch * s_q * s_k * d_v


def _pointwise(func, args, kwargs):
    """The result of an out-of-place element-wise operator on one or two operands (tensors or
    scalars), laid out like the operand of the result's shape; None when that is not plain."""
    name = func._overloadpacket.__name__
    if kwargs or name.endswith("_") or len(args) > 2:
        return None
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not all(t.device.type == "meta" for t in tensors) or not all(
            isinstance(a, (torch.Tensor, int, float, bool)) for a in args):
        return None
    shape = _broadcast(*(tuple(t.shape) for t in tensors))
    like = next((t for t in tensors if tuple(t.shape) == shape), None)
    if like is None:
        return None
    if name in _BOOL_RESULT:
        dtype = torch.bool
    elif len(args) == 2:
        dtype = torch.result_type(args[0], args[1])
    else:
        dtype = like.dtype
    return _like(like, dtype)


_SPECIAL = {aten._softmax_backward_data.default, aten.native_group_norm.default, aten.native_layer_norm.default,
            aten.native_group_norm_backward.default, aten.native_layer_norm_backward.default, aten.linear.default,
            aten.scaled_dot_product_attention.default}
_KINDS: dict = {}


def _classify(func) -> str:
    """How the counter treats an operator (decided once per operator)."""
    if func in _QUERIES:
        kind = "query"
    elif func in _SAME_SHAPE or func in _SPECIAL or torch.Tag.pointwise in func.tags:
        kind = "fast"  # a plain result on meta; otherwise as below
    elif func._overloadpacket in flop_registry:
        kind = "counted"
    elif func is not torch.ops.prim.device.default and torch._C._dispatch_has_kernel_for_dispatch_key(
            func.name(), torch._C.DispatchKey.CompositeImplicitAutograd):
        kind = "composite"
    else:
        kind = "plain"
    _KINDS[func] = kind
    return kind


class FlopCounter(TorchDispatchMode):
    """``with FlopCounter() as fc: ...; fc.total`` — FLOPs of everything run inside."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _KINDS.get(func) or _classify(func)
        if kind == "query":
            return NotImplemented
        if kind == "fast" and args and _meta(args[0]):
            out = self._fast(func, args, kwargs)
            if out is not None:
                return out
        if kind == "counted":
            out = func(*args, **kwargs)
            self.total += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
            return out
        if kind != "plain":  # composite: count the operators it decomposes into
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        return func(*args, **kwargs)

    def _fast(self, func, args, kwargs):
        x = args[0]
        if func in _SAME_SHAPE:
            return _like(x)
        if torch.Tag.pointwise in func.tags:
            return _pointwise(func, args, kwargs)
        if func is aten._softmax_backward_data.default:
            return _like(x, args[3])
        if func is aten.native_group_norm.default:  # (out, mean, rstd) with statistics per (row, group)
            stats = (args[3], args[6])
            return _like(x), x.new_empty(stats), x.new_empty(stats)
        if func is aten.native_layer_norm.default:
            dims = len(args[1])
            stats = (*x.shape[:x.ndim - dims], *([1] * dims))
            return _like(x), x.new_empty(stats, dtype=torch.float32), x.new_empty(stats, dtype=torch.float32)
        if func in (aten.native_group_norm_backward.default, aten.native_layer_norm_backward.default):
            inp, mask = args[1], args[-1]
            weight = args[4] if func is aten.native_group_norm_backward.default else args[5]
            params = (weight.shape if weight is not None else (inp.shape[1],))
            return (_like(inp) if mask[0] else None, inp.new_empty(params) if mask[1] else None,
                    inp.new_empty(params) if mask[2] else None)
        if func is aten.linear.default and _meta(args[1]):
            w = args[1]
            self.total += linear_flops(x.shape, w.shape)
            return torch.empty((*x.shape[:-1], w.shape[0]), dtype=x.dtype, device="meta")
        if func is aten.scaled_dot_product_attention.default and not kwargs.get("enable_gqa", False):
            k, v = args[1], args[2]
            if _meta(k) and _meta(v) and k.shape[:-2] == x.shape[:-2] == v.shape[:-2]:
                self.total += attention_flops(x.shape, k.shape, v.shape)
                # laid out as the fused kernels return it: heads inner, so (b, s, h*d) views work
                shape = (*x.shape[:-3], x.shape[-2], x.shape[-3], v.shape[-1]) if x.ndim >= 3 else None
                if shape is None:
                    return torch.empty((*x.shape[:-1], v.shape[-1]), dtype=x.dtype, device="meta")
                return torch.empty(shape, dtype=x.dtype, device="meta").transpose(-2, -3)
        return None
