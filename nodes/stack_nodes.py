"""Nodes that build a LoRA stack and apply its text-encoder half."""
from __future__ import annotations

import logging

from ..cmlora_core.errors import CMLoRAError
from ..cmlora_core.lora_file import FileCache
from ..cmlora_core.stack import CATEGORIES, LoraEntry, LoraStack
from ..cmlora_core.steps import CURVES
from . import host
from .checks import check_inputs, check_mask_values, check_number, shown
from .host import io
from .loras import load_lora_file, map_clip_lora

log = logging.getLogger("cmlora")

Stack = io.Custom("CMLORA_STACK")
LoraStackType = io.Custom("LORA_STACK")


STRENGTH = 20.0  # the stack node's strength range, -STRENGTH..STRENGTH; LORA_STACK entries are held to it too


def make_entry(name, strength_model, strength_clip, enabled, category, concept, trigger, node, input="lora_name",
               start_at=0.0, end_at=1.0, strength_curve="constant", strength_model_end=0.0, mask=None,
               mask_feather=0) -> LoraEntry:
    """A stack entry from checked values (strengths finite and within -STRENGTH..STRENGTH)."""
    if category not in CATEGORIES:
        raise CMLoRAError(node, "category", f"unknown category {category!r}.", f"choose one of {', '.join(CATEGORIES)}.")
    if strength_curve not in CURVES:
        raise CMLoRAError(node, "strength_curve", f"unknown curve {strength_curve!r}.", f"choose one of {', '.join(CURVES)}.")
    if not start_at < end_at:
        raise CMLoRAError(node, "end_at", f"end_at {end_at:g} is not after start_at {start_at:g}, so the LoRA would "
                          "be on no step.", "set end_at above start_at (0.5 and 1.0: the second half of the sampling).")
    region = None if mask is None else region_mask(mask, node)
    lf = load_lora_file(name, node, input)
    return LoraEntry(name=name, path=lf.info.path, strength_model=float(strength_model),
                     strength_clip=float(strength_clip), enabled=bool(enabled), category=category,
                     concept=concept.strip(), trigger=trigger.strip() or lf.info.trigger, info=lf.info,
                     start=float(start_at), end=float(end_at), curve=strength_curve,
                     strength_end=float(strength_model_end), mask=region, feather=float(mask_feather))


def region_mask(mask, node: str):
    """The (H, W) region of a MASK input: one mask (a batch of one), values in 0..1."""
    import torch

    if not torch.is_tensor(mask) or mask.ndim not in (2, 3) or mask.ndim == 3 and mask.shape[0] != 1:
        shape = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
        raise CMLoRAError(node, "mask", f"expected one mask, got {shape}.",
                          "connect a single MASK (e.g. from Load Image (as Mask) or a mask editor), not a batch.")
    region = (mask[0] if mask.ndim == 3 else mask).detach().float().cpu()
    check_mask_values(region, node, "mask", "connect a MASK output (values 0 to 1) of the image's size.")
    if float(region.max()) == 0.0:
        raise CMLoRAError(node, "mask", "the mask is empty (all 0), so the LoRA would act nowhere.",
                          "paint the LoRA's region in the mask, or disconnect it.")
    return region


class LoraStackNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return host.schema(
            node_id="CMLoRA_LoraStack",
            search_aliases=['lora stack', 'multi lora', 'lora stacker'],
            display_name="CMLoRA LoRA Stack",
            category="loaders/cmlora",
            description="Adds one LoRA to a stack. Chain several to compose a character, outfit, style, "
                        "background and objects; the order of the chain is the order of the stack.",
            inputs=[
                io.Combo.Input("lora_name", options=host.lora_names(), tooltip="The LoRA file, from the loras folder."),
                io.Float.Input("strength_model", default=1.0, min=-STRENGTH, max=STRENGTH, step=0.01,
                               tooltip="How strongly the LoRA changes the diffusion model (0 leaves it out)."),
                io.Float.Input("strength_clip", default=1.0, min=-STRENGTH, max=STRENGTH, step=0.01,
                               tooltip="How strongly the LoRA changes the text encoder (used by CMLoRA Apply CLIP)."),
                io.Boolean.Input("enabled", default=True, tooltip="Turn this LoRA off without unwiring it."),
                io.Combo.Input("category", options=list(CATEGORIES), default="auto",
                               tooltip="What the LoRA depicts; CMLoRA treats background as low-frequency, the rest as "
                                       "high-frequency. 'auto' lets the profiler measure it."),
                io.String.Input("concept", default="", tooltip="The prompt words this LoRA depicts, e.g. 'cat'."),
                io.String.Input("trigger", default="",
                                tooltip="Trigger words; left empty, they are read from the file's training metadata.", **host.ADVANCED),
                Stack.Input("stack", optional=True, tooltip="The stack to append to (leave empty to start one)."),
                io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Where on the noise level the LoRA turns on, from pure noise (0) to the "
                                       "clean image (1): the measure of ControlNet's start_percent (0: from the first "
                                       "step). On the normal scheduler about the fraction of the steps; a run split "
                                       "into KSamplerAdvanced passes keeps it. Every method honours it.", **host.ADVANCED),
                io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Where on the noise level the LoRA turns off, as ControlNet's end_percent (0.5: "
                                       "the first half, e.g. for turbo or composition LoRAs; 1: to the end).",
                               **host.ADVANCED),
                io.Combo.Input("strength_curve", options=list(CURVES), default="constant", optional=True,
                               tooltip="How strength_model changes while the LoRA is on: constant, or a linear or "
                                       "smooth ramp from strength_model at start_at to strength_model_end at end_at.",
                               **host.ADVANCED),
                io.Float.Input("strength_model_end", default=0.0, min=-STRENGTH, max=STRENGTH, step=0.01,
                               optional=True, tooltip="The model strength at end_at, for the linear and smooth "
                                                      "curves.", **host.ADVANCED),
                io.Mask.Input("mask", optional=True,
                              tooltip="Confines this LoRA to the white part of the mask (method 'regions' of CMLoRA "
                                      "Apply / Sampler). Outside every mask: the LoRAs without a mask, or the base "
                                      "model."),
                io.Int.Input("mask_feather", default=16, min=0, max=512, optional=True,
                             tooltip="The width in mask pixels of the soft edge, centred on the mask's edge: the LoRA's "
                                     "weight is 1 from half this inside the edge, 0 from half this outside it, "
                                     "a linear blend between.",
                             **host.ADVANCED),
            ],
            outputs=[Stack.Output(display_name="stack", tooltip="The stack with this LoRA appended.")],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name, **kwargs):
        path = host.lora_path(lora_name)
        try:
            return FileCache.identity(path) if path else lora_name
        except OSError:
            return lora_name

    @classmethod
    def execute(cls, lora_name, strength_model, strength_clip, enabled, category, concept, trigger, stack=None,
                start_at=0.0, end_at=1.0, strength_curve="constant", strength_model_end=0.0, mask=None,
                mask_feather=16):
        node = check_inputs(cls, locals(), looked_up=("lora_name",))
        entry = make_entry(lora_name, strength_model, strength_clip, enabled, category, concept, trigger, node,
                           start_at=start_at, end_at=end_at, strength_curve=strength_curve,
                           strength_model_end=strength_model_end, mask=mask, mask_feather=mask_feather)
        stack = (stack or LoraStack()).append(entry, node)
        text = f"{entry.name}: {entry.info.describe()}" + (f"; trigger '{entry.trigger}'" if entry.trigger else "")
        if entry.scheduled:
            text += f"\n{entry.describe_schedule()} (model strength; the text encoder keeps strength_clip)"
        if entry.mask is not None:
            covered = float((entry.mask > 0.5).float().mean())
            text += (f"\nregion: {covered:.0%} of a {entry.mask.shape[1]}x{entry.mask.shape[0]} mask, feather "
                     f"{mask_feather}px (method 'regions')")
        log.info("CMLoRA stack entry %d: %s", len(stack), text)
        return io.NodeOutput(stack, ui=host.ui.PreviewText(text))


class StackFromLoraStack(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return host.schema(
            node_id="CMLoRA_StackFromLoraStack",
            search_aliases=['lora_stack', 'lora stack convert'],
            display_name="CMLoRA Stack from LORA_STACK",
            category="loaders/cmlora",
            description="Converts the LORA_STACK of other node packs (a list of (lora_name, strength_model, "
                        "strength_clip)) into a CMLoRA stack.",
            inputs=[
                LoraStackType.Input("lora_stack", tooltip="A LORA_STACK from another pack's LoRA stacker."),
                Stack.Input("stack", optional=True, tooltip="A CMLoRA stack to append the converted entries to."),
            ],
            outputs=[Stack.Output(display_name="stack", tooltip="The CMLoRA stack (categories 'auto').")],
        )

    @classmethod
    def execute(cls, lora_stack, stack=None):
        node = check_inputs(cls, locals())
        stack = stack or LoraStack()
        for i, item in enumerate(lora_stack):
            if not (isinstance(item, (list, tuple)) and len(item) >= 3):
                raise CMLoRAError(node, "lora_stack", f"item {i + 1} is {shown(item)}, not (name, strength_model, "
                                  "strength_clip).", "connect the LORA_STACK output of a LoRA stacker node.")
            name, sm, sc = item[0], item[1], item[2]
            if name in (None, "None", ""):
                continue  # stackers use "None" for an empty slot
            for label, value in (("strength_model", sm), ("strength_clip", sc)):  # held to the stack node's range
                check_number(node, "lora_stack", value, -STRENGTH, STRENGTH, what=f"{label} of {shown(name)}")
            stack = stack.append(make_entry(name, sm, sc, True, "auto", "", "", node, "lora_stack"), node)
        return io.NodeOutput(stack)


class ApplyClip(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return host.schema(
            node_id="CMLoRA_ApplyClip",
            search_aliases=['lora clip', 'multi lora clip'],
            display_name="CMLoRA Apply CLIP",
            category="loaders/cmlora",
            description="Merges every enabled LoRA's text-encoder weights into the CLIP at its clip strength, "
                        "as LoraLoader does; encode the prompt with the result.",
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder from your checkpoint."),
                Stack.Input("stack", tooltip="The LoRA stack."),
            ],
            outputs=[io.Clip.Output(display_name="clip", tooltip="The text encoder with the stack's LoRAs merged.")],
        )

    @classmethod
    def execute(cls, clip, stack):
        node = check_inputs(cls, locals())
        if stack is None or len(stack) == 0:
            raise CMLoRAError(node, "stack", "the LoRA stack is empty.", "connect a 'CMLoRA LoRA Stack' node.")
        out = clip.clone()
        for entry in stack.clip_entries():
            mapped = map_clip_lora(clip, entry, node)
            if mapped is not None:
                out.add_patches(mapped.patches, entry.strength_clip)
                log.info("CMLoRA CLIP: %s", mapped.describe())
        return io.NodeOutput(out)
