"""CMLoRA's cache split of a ComfyUI UNet: the outer full-resolution blocks and the deep rest.

The split is read from the model's structure, so SD1.5 and SDXL (and any UNetModel) work:
the *shallow* part is the input blocks before the first downsampling block, the output
blocks that consume their skip connections (the same number, at the end), and the output
layer. The *deep feature* is the hidden state entering the first of those output blocks
(for SD1.5, the 640-channel map entering diffusers' up_blocks[3]).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cmlora_core.errors import CMLoRAError
from . import host


@dataclass(frozen=True)
class UNetSplit:
    n_in: int  # input blocks at full resolution (their outputs are the skips the shallow part needs)
    out_start: int  # index of the first output block of the shallow part
    out_transformer_index: int = 0  # transformer layers a full pass runs before that block

    def is_capture_block(self, transformer_options: dict) -> bool:
        return transformer_options.get("block") == ("output", self.out_start)


def find_split(unet, node: str = "CMLoRA Apply") -> UNetSplit:
    if not isinstance(unet, host.UNetModel):
        raise CMLoRAError(node, "model",
                          f"the deep-feature cache needs a UNet; this model is a {type(unet).__name__}.",
                          "use cache 'none' or 'prediction' in the Frequency Scheduler.")
    for i, block in enumerate(unet.input_blocks):
        if any(isinstance(m, host.Downsample) for m in block):
            out_start = len(unet.output_blocks) - i
            before = [*unet.input_blocks, *([unet.middle_block] if unet.middle_block is not None else []),
                      *unet.output_blocks[:out_start]]
            transformers = sum(1 for b in before for m in b if hasattr(m, "transformer_blocks"))
            return UNetSplit(i, out_start, transformers)
    raise CMLoRAError(node, "model", "this UNet never downsamples; there is no deep part to cache.",
                      "use cache 'none' or 'prediction' in the Frequency Scheduler.")


def capture_patch(split: UNetSplit, sink: list, copy: bool = False):
    """An ``output_block_patch`` that stores the hidden state entering the split block. It must run
    before the other nodes' output-block patches (``capturing``): the deep feature is what the shallow
    pass starts from, and the shallow pass runs those patches itself. ``copy``: store a copy, for
    patches that write into ``h`` (FreeU does)."""

    def patch(h, hsp, transformer_options):
        if split.is_capture_block(transformer_options):
            sink.append(h.clone() if copy else h)
        return h, hsp

    return patch


def capturing(options: dict, split: UNetSplit, sink: list) -> dict:
    """``transformer_options`` whose first output-block patch stores the deep feature in ``sink``."""
    patches = {k: list(v) for k, v in options.get("patches", {}).items()}
    others = patches.get("output_block_patch", [])
    patches["output_block_patch"] = [capture_patch(split, sink, copy=bool(others))] + others
    return {**options, "patches": patches}


def _residual(control, name: str, k: int):
    """The ControlNet / T2I-Adapter residual the host adds at the k-th ``name`` point of a full pass.

    The host pops each list from its end, once per block; this reads the same element without
    popping, so the full pass and the shallow passes of one model call can share the residuals.
    """
    if not control or not control.get(name):
        return None
    seq = control[name]
    return seq[len(seq) - 1 - k] if k < len(seq) else None


def _add(h, residual):
    if residual is not None:
        h += residual
    return h


def shallow_forward(unet, split: UNetSplit, x, timesteps, context, y, deep, transformer_options, control=None):
    """The outer blocks only, with ``deep`` in place of everything deeper.

    Follows UNetModel._forward for the blocks it runs — ControlNet residuals, other nodes' block
    patches and the transformer index included — so with a fresh deep feature (captured by
    ``capturing``) the result equals the full pass exactly.
    """
    to = transformer_options
    to["original_shape"] = list(x.shape)
    to["transformer_index"] = 0
    patches = to.get("patches", {})
    emb = unet.time_embed(host.timestep_embedding(timesteps, unet.model_channels, repeat_only=False).to(x.dtype))
    for p in patches.get("emb_patch", []):
        emb = p(emb, unet.model_channels, to)
    if unet.num_classes is not None:
        emb = emb + unet.label_emb(y)
    hs, h = [], x
    for i in range(split.n_in):
        to["block"] = ("input", i)
        h = host.forward_timestep_embed(unet.input_blocks[i], h, emb, context, to)
        h = _add(h, _residual(control, "input", i))
        for p in patches.get("input_block_patch", []):
            h = p(h, to)
        hs.append(h)
        for p in patches.get("input_block_patch_after_skip", []):
            h = p(h, to)
    h = deep
    to["transformer_index"] = split.out_transformer_index
    for i in range(split.out_start, len(unet.output_blocks)):
        to["block"] = ("output", i)
        hsp = _add(hs.pop(), _residual(control, "output", i))
        for p in patches.get("output_block_patch", []):
            h, hsp = p(h, hsp, to)
        h = torch.cat([h, hsp], dim=1)
        output_shape = hs[-1].shape if hs else None
        h = host.forward_timestep_embed(unet.output_blocks[i], h, emb, context, to, output_shape)
    return unet.out(h.type(x.dtype))


FLOP_FRACTIONS: dict = {}  # (architecture, split, input shapes) -> fraction


def shallow_fraction(base_model, split: UNetSplit, x, context, y) -> float:
    """FLOPs of a shallow pass over FLOPs of a full pass for inputs shaped like these.

    Counted on the meta device, on the model's architecture rebuilt without weights: no
    pass of the real model runs for it, and the count is what the benchmark's counter gives
    (the same counter). Made once per process for each architecture and input shape.
    """
    config = base_model.model_config.unet_config
    key = (type(base_model.diffusion_model).__name__, repr(sorted(config.items(), key=lambda kv: kv[0])), split,
           tuple(x.shape[1:]), None if context is None else tuple(context.shape[1:]),
           None if y is None else tuple(y.shape[1:]))
    if key not in FLOP_FRACTIONS:
        unet = host.meta_diffusion_model(base_model)
        dtype = next(unet.parameters()).dtype

        def empty(v):
            return None if v is None else torch.empty(1, *v.shape[1:], device="meta", dtype=dtype)

        full, shallow = count_passes(unet, split, empty(x), torch.empty(1, device="meta"), empty(context), empty(y))
        FLOP_FRACTIONS[key] = shallow / full if full else 1.0
    return FLOP_FRACTIONS[key]


def count_passes(unet, split: UNetSplit, x, timesteps, context, y=None) -> tuple[int, int]:
    """FLOPs of one full and one shallow pass of ``unet`` on these meta-device inputs (the runtime's
    report and the benchmark's tables both count with this)."""
    from ..cmlora_core.flops import FlopCounter

    sink: list = []
    options = capturing({}, split, sink)
    with torch.inference_mode(), host.meta_attention():
        with FlopCounter() as full:
            unet(x, timesteps, context=context, y=y, transformer_options=options)
        with FlopCounter() as shallow:
            shallow_forward(unet, split, x, timesteps, context, y, sink[0], {})
    return full.total, shallow.total
