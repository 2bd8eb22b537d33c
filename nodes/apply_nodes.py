"""CMLoRA Apply (a patched MODEL for any sampler) and CMLoRA Sampler (the one-node path)."""
from __future__ import annotations

import logging

from ..cmlora_core.errors import CMLoRAError
from ..cmlora_core.stack import require_model_entries
from . import host
from .checks import check_inputs
from .host import io
from .loras import map_model_lora
from .profiling import model_fingerprint
from .methods import METHODS, apply_method
from .runtime import runtime_of
from .stack_nodes import Stack

log = logging.getLogger("cmlora")

Schedule = io.Custom("CMLORA_SCHEDULE")


def _apply_inputs():
    return [
        io.Model.Input("model", tooltip="The base model (after any LoraLoader you want under every LoRA)."),
        Stack.Input("stack", tooltip="The LoRAs to compose, from 'CMLoRA LoRA Stack' nodes."),
        io.Combo.Input("method", options=list(METHODS), default="composite",
                       tooltip="merge: all LoRAs in the weights (like chained LoraLoaders). switch: one LoRA per "
                               "step, rotating. composite: every LoRA's prediction averaged each step. cmlora: "
                               "frequency-scheduled dominant LoRA (needs a schedule)."),
        io.Int.Input("switch_interval", default=5, min=1, max=1000,
                     tooltip="Switch: steps each LoRA stays active before the next one takes over.", **host.ADVANCED),
        Schedule.Input("schedule", optional=True, tooltip="A CMLoRA frequency schedule (method 'cmlora' only)."),
    ]


def patched_model(model, stack, method, switch_interval, schedule, node):
    """The patched clone and the mapped LoRAs, for inputs the node's ``check_inputs`` has checked."""
    if schedule is not None and method != "cmlora":
        raise CMLoRAError(node, "schedule", f"a schedule is connected but method is '{method}', which ignores it.",
                          "set method to 'cmlora' or disconnect the schedule.")
    entries = require_model_entries(stack, node)
    skipped = [e.name for e in stack if not e.active_model]
    if skipped:
        log.info("CMLoRA: skipping inactive stack entries (disabled or strength_model 0): %s", ", ".join(skipped))
    mapped = [map_model_lora(model, e, node) for e in entries]
    if schedule is not None and schedule.base_model:
        if schedule.base_model != model_fingerprint(model):
            raise CMLoRAError(node, "schedule",
                              f"the schedule's profile was measured on another base model ({schedule.base_model}, "
                              f"this one is {model_fingerprint(model)}).",
                              "profile the LoRAs again on this checkpoint.")
    for m in mapped:
        log.info("CMLoRA %s: %s", method, m.describe())
    return apply_method(model, mapped, method, switch_interval, node, schedule), mapped


class ApplyNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return host.schema(
            node_id="CMLoRA_Apply",
            search_aliases=['multi lora', 'lora composite', 'lora switch', 'lora merge', 'compose loras'],
            display_name="CMLoRA Apply",
            category="loaders/cmlora",
            description="Patches the model so that any sampler (KSampler, KSamplerAdvanced, SamplerCustomAdvanced) "
                        "composes the stack's LoRAs with the chosen method. The input model is not changed.",
            inputs=_apply_inputs(),
            outputs=[io.Model.Output(display_name="model", tooltip="The model that composes the stack when sampled.")],
        )

    @classmethod
    def execute(cls, model, stack, method, switch_interval, schedule=None):
        node = check_inputs(cls, locals())
        out, _ = patched_model(model, stack, method, switch_interval, schedule, node)
        return io.NodeOutput(out)


class SamplerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return host.schema(
            node_id="CMLoRA_Sampler",
            search_aliases=['multi lora sampler', 'lora composite', 'lora switch', 'ksampler lora'],
            display_name="CMLoRA Sampler",
            category="sampling/cmlora",
            description="CMLoRA Apply and a KSampler in one node: composes the stack's LoRAs while sampling.",
            inputs=_apply_inputs() + [
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The random seed used for creating the noise."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="The number of denoising steps."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale; 1 skips the negative prompt."),
                io.Combo.Input("sampler_name", options=host.SAMPLER_NAMES, tooltip="The sampling algorithm."),
                io.Combo.Input("scheduler", options=host.SCHEDULER_NAMES, tooltip="How the noise levels are spaced."),
                io.Conditioning.Input("positive", tooltip="What the image should show (encode with the CLIP from "
                                                          "'CMLoRA Apply CLIP')."),
                io.Conditioning.Input("negative", tooltip="What the image should not show."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise, e.g. from Empty Latent Image."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="How much of the latent to replace; below 1 keeps part of the input."),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT", tooltip="The denoised latent."),
                io.String.Output(display_name="report", tooltip="What the run did: LoRAs, mapping, steps, calls."),
            ],
        )

    @classmethod
    def execute(cls, model, stack, method, switch_interval, seed, steps, cfg, sampler_name, scheduler,
                positive, negative, latent_image, denoise, schedule=None):
        node = check_inputs(cls, locals())
        patched, mapped = patched_model(model, stack, method, switch_interval, schedule, node)
        latent = host.ksampler(patched, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                               latent_image, denoise)
        lines = [f"method {method}, {len(mapped)} LoRAs, {steps} steps, cfg {cfg}, {sampler_name}/{scheduler}"]
        lines += [m.describe() for m in mapped]
        runtime = runtime_of(patched)
        if runtime is not None:
            lines.append("run: " + runtime.report(runtime.last_trace))
        report = "\n".join(lines)
        return io.NodeOutput(latent, report, ui=host.ui.PreviewText(report))
