"""Nodes that build a LoRA stack and apply its text-encoder half."""
from __future__ import annotations

import logging

from ..cmlora_core.errors import CMLoRAError
from ..cmlora_core.lora_file import FileCache
from ..cmlora_core.stack import CATEGORIES, LoraEntry, LoraStack
from . import host
from .checks import check_inputs, check_number, shown
from .host import io
from .loras import load_lora_file, map_clip_lora

log = logging.getLogger("cmlora")

Stack = io.Custom("CMLORA_STACK")
LoraStackType = io.Custom("LORA_STACK")


STRENGTH = 20.0  # the stack node's strength range, -STRENGTH..STRENGTH; LORA_STACK entries are held to it too


def make_entry(name, strength_model, strength_clip, enabled, category, concept, trigger, node, input="lora_name") -> LoraEntry:
    """A stack entry from checked values (strengths finite and within -STRENGTH..STRENGTH)."""
    if category not in CATEGORIES:
        raise CMLoRAError(node, "category", f"unknown category {category!r}.", f"choose one of {', '.join(CATEGORIES)}.")
    lf = load_lora_file(name, node, input)
    return LoraEntry(name=name, path=lf.info.path, strength_model=float(strength_model),
                     strength_clip=float(strength_clip), enabled=bool(enabled), category=category,
                     concept=concept.strip(), trigger=trigger.strip() or lf.info.trigger, info=lf.info)


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
    def execute(cls, lora_name, strength_model, strength_clip, enabled, category, concept, trigger, stack=None):
        node = check_inputs(cls, locals(), looked_up=("lora_name",))
        entry = make_entry(lora_name, strength_model, strength_clip, enabled, category, concept, trigger, node)
        stack = (stack or LoraStack()).append(entry, node)
        text = f"{entry.name}: {entry.info.describe()}" + (f"; trigger '{entry.trigger}'" if entry.trigger else "")
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
