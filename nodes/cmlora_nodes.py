"""CMLoRA nodes: LoRA Profiler, Frequency Scheduler, and saving/loading profiles."""
from __future__ import annotations

import json
import logging
import os

from ..cmlora_core.cmlora import (CACHES, MODES, REFRESH, W_DOM, Planner, Schedule, ScheduleMismatch, ScheduleSettings,
                                  check_schedule, sets_from_categories)
from ..cmlora_core.errors import CMLoRAError
from ..cmlora_core.stack import on_sets, require_model_entries
from ..cmlora_core.steps import NoiseSteps
from . import host
from .apply_nodes import Schedule as ScheduleType
from .checks import check_inputs, save_path, saved_files, saved_folder
from .host import io
from .loras import map_model_lora
from .plots import profile_plot, set_lines, timeline_plot
from .profiling import check_profile, profile_loras
from .stack_nodes import Stack

log = logging.getLogger("cmlora")

Profile = io.Custom("CMLORA_PROFILE")
PROFILE_DIR = "cmlora_profiles"


class ProfilerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return host.schema(
            node_id="CMLoRA_Profiler",
            search_aliases=['lora frequency', 'lora fourier profile'],
            display_name="CMLoRA LoRA Profiler",
            category="sampling/cmlora",
            description="Samples the base model and each LoRA alone with the same seed and prompt, measures how much "
                        "high-frequency detail each adds (Fourier spectrum), and splits the stack into "
                        "high-frequency (early) and low-frequency (late) LoRAs for the Frequency Scheduler.",
            inputs=[
                io.Model.Input("model", tooltip="The base model."),
                Stack.Input("stack", tooltip="The LoRAs to profile; categories other than 'auto' override the measurement."),
                io.Conditioning.Input("positive", tooltip="The prompt to profile with (the one you will sample)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt."),
                io.Latent.Input("latent_image", tooltip="The latent size to profile at, e.g. from Empty Latent Image."),
                # a profile is only valid for the seed it was measured with, so the frontend must not add its
                # "control after generate" widget (it does for any INT named seed unless told otherwise)
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="The seed of every profiling run; it stays fixed so a saved profile matches it."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Steps of each profiling run."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="Guidance scale."),
                io.Combo.Input("sampler_name", options=host.SAMPLER_NAMES, tooltip="The sampling algorithm."),
                io.Combo.Input("scheduler", options=host.SCHEDULER_NAMES, tooltip="How the noise levels are spaced."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Profile decoded images (as the paper does); without it, predicted latents."),
            ],
            outputs=[
                Profile.Output(display_name="profile", tooltip="Scores, spectra, the H/L split and the order."),
                io.Image.Output(display_name="plot", tooltip="Each LoRA's spectrum and high-frequency score over steps."),
            ],
        )

    @classmethod
    def execute(cls, model, stack, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, vae=None):
        node = check_inputs(cls, locals())
        entries = require_model_entries(stack, node)
        mapped = [map_model_lora(model, e, node) for e in entries]
        profile = profile_loras(model, mapped, positive, negative, latent_image, seed, steps, cfg, sampler_name,
                                scheduler, vae, node)
        return io.NodeOutput(profile, profile_plot(profile))


class SchedulerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return host.schema(
            node_id="CMLoRA_FrequencyScheduler",
            search_aliases=['lora schedule', 'frequency schedule', 'cmlora'],
            display_name="CMLoRA Frequency Scheduler",
            category="sampling/cmlora",
            description="Plans which LoRA dominates each step (high-frequency LoRAs early, low-frequency late) and "
                        "which LoRAs reuse cached features. Feed it to CMLoRA Apply / Sampler with method 'cmlora'.",
            inputs=[
                Profile.Input("profile", optional=True,
                              tooltip="From the LoRA Profiler. Without it the stack's categories decide "
                                      "(background = low-frequency, the rest high)."),
                io.Combo.Input("mode", options=list(MODES), default="offline",
                               tooltip="offline: switch from H to L at h_to_l_fraction of the steps. online: switch "
                                       "when the image's high-frequency share drops below online_threshold. async: "
                                       "dominant LoRA every switch_interval steps, caches refreshed on their own clock."),
                io.Int.Input("switch_interval", default=5, min=1, max=1000,
                             tooltip="async: steps each LoRA dominates before the next one."),
                io.Combo.Input("cache", options=list(CACHES), default="deep",
                               tooltip="deep: non-refreshed LoRAs run only the outer UNet blocks around their cached "
                                       "deep feature. prediction: they reuse their last prediction. none: every LoRA "
                                       "runs fully every step."),
                io.Combo.Input("refresh", options=list(REFRESH), default="nonuniform",
                               tooltip="When caches refresh: nonuniform (every 2, then 3, then 2 steps) or uniform "
                                       "(every refresh_interval steps).", **host.ADVANCED),
                io.Int.Input("refresh_interval", default=2, min=1, max=1000, tooltip="uniform refresh: steps between refreshes.", **host.ADVANCED),
                io.Float.Input("h_to_l_fraction", default=0.55, min=0.0, max=1.0, step=0.01,
                               tooltip="offline: fraction of the steps led by high-frequency LoRAs.", **host.ADVANCED),
                io.Float.Input("online_threshold", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="online: switch to low-frequency LoRAs when the predicted image's "
                                       "high-frequency score falls below this (0 never switches).", **host.ADVANCED),
                io.Combo.Input("w_dom", options=list(W_DOM), default="constant",
                               tooltip="Weight of the dominant LoRA: constant N - 0.5 (reference code) or decaying "
                                       "to 1 over the run (our reading of the paper).", **host.ADVANCED),
                io.Boolean.Input("dominant_full", default=True,
                                 tooltip="Give the dominant LoRA a full pass every step (the paper); off reproduces "
                                         "the reference code, where it runs shallow between refreshes.", **host.ADVANCED),
                Stack.Input("stack", optional=True, tooltip="The stack, used when no profile is connected."),
                io.Int.Input("preview_steps", default=20, min=1, max=1000,
                             tooltip="Steps drawn in the timeline picture only; the plan follows the sampler's steps.", **host.ADVANCED),
            ],
            outputs=[
                ScheduleType.Output(display_name="schedule", tooltip="The plan, computed for the sampler's step count."),
                io.Image.Output(display_name="timeline",
                                tooltip="Per step: the dominant LoRA (red frame) and who runs a full or shallow pass."),
            ],
        )

    @classmethod
    def execute(cls, mode, switch_interval, cache, refresh, refresh_interval, h_to_l_fraction, online_threshold,
                w_dom, dominant_full, preview_steps, profile=None, stack=None):
        node = check_inputs(cls, locals())
        settings = ScheduleSettings(mode, switch_interval, cache, refresh, refresh_interval, h_to_l_fraction,
                                    online_threshold, w_dom, dominant_full)
        if profile is not None:
            profile = check_profile(profile, node)
            names = [e["name"] for e in profile["loras"]]
            index = {n: i for i, n in enumerate(names)}
            schedule = Schedule(settings, tuple(index[n] for n in profile["high"]), tuple(index[n] for n in profile["low"]),
                                tuple(names), "profile", profile["base_model"])
        elif stack is not None:
            entries = require_model_entries(stack, node)
            high, low = sets_from_categories([e.category for e in entries])
            schedule = Schedule(settings, tuple(high), tuple(low), tuple(e.name for e in entries), "categories")
        else:
            raise CMLoRAError(node, "profile", "neither a profile nor a stack is connected.",
                              "connect the LoRA Profiler's profile, or the LoRA stack to schedule by categories.")
        try:
            check_schedule(schedule, schedule.names)
        except ScheduleMismatch as e:
            raise CMLoRAError(node, e.input, e.problem, e.fix) from None
        n = len(schedule.names)
        steps = max(preview_steps, n)
        planner = Planner(schedule, steps, _on_sets(stack, schedule, steps))
        plans = [planner.plan(i) for i in range(steps)]
        heading = f"CMLoRA {mode} schedule, cache {cache}, {refresh} refresh, {steps} steps shown"
        if mode == "online":
            heading += " (the switch to L happens while sampling, when the image's detail drops; not drawn here)"
        names = list(schedule.names)
        log.info("CMLoRA schedule: %s; %s", heading, "; ".join(set_lines(names, schedule.high, schedule.low)))
        return io.NodeOutput(schedule, timeline_plot(names, plans, schedule.high, schedule.low, heading))


def _on_sets(stack, schedule: Schedule, steps: int) -> list[set[int]] | None:
    """The LoRAs on at each previewed step, from the connected stack's ranges and curves on steps evenly
    spaced on the noise level (None: every LoRA on every step, or no stack of these LoRAs to read them from)."""
    entries = stack.model_entries() if stack is not None else ()
    if tuple(e.name for e in entries) != tuple(schedule.names) or not any(e.scheduled for e in entries):
        return None
    return on_sets(entries, NoiseSteps.even(steps))


class SaveProfile(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return host.schema(
            node_id="CMLoRA_SaveProfile",
            search_aliases=['save lora profile'],
            display_name="CMLoRA Save Profile",
            category="sampling/cmlora",
            description="Writes a profile as JSON to output/cmlora_profiles, to reuse it without profiling again.",
            inputs=[
                Profile.Input("profile", tooltip="The profile to save."),
                io.String.Input("filename", default="profile", tooltip="File name (without .json) in output/cmlora_profiles."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, profile, filename):
        node = check_inputs(cls, locals())
        profile = check_profile(profile, node)
        path = save_path(node, "filename", filename, "profile", PROFILE_DIR, ".json")
        with open(path, "w") as f:
            json.dump(profile, f, indent=1)
        return io.NodeOutput(ui=host.ui.PreviewText(f"saved {path}"))


class LoadProfile(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = saved_files(PROFILE_DIR, ".json")
        return host.schema(
            node_id="CMLoRA_LoadProfile",
            search_aliases=['load lora profile'],
            display_name="CMLoRA Load Profile",
            category="sampling/cmlora",
            description="Reads a profile saved by CMLoRA Save Profile.",
            inputs=[io.Combo.Input("profile_file", options=files, tooltip="A JSON file from output/cmlora_profiles.")],
            outputs=[Profile.Output(display_name="profile", tooltip="The loaded profile.")],
        )

    @classmethod
    def fingerprint_inputs(cls, profile_file):
        known = profile_file in saved_files(PROFILE_DIR, ".json")
        path = os.path.join(saved_folder(PROFILE_DIR), profile_file) if known else None
        return os.path.getmtime(path) if path else profile_file

    @classmethod
    def execute(cls, profile_file):
        node = check_inputs(cls, locals())  # the name is one of the folder's files
        path = os.path.join(saved_folder(PROFILE_DIR), profile_file)
        try:
            with open(path, encoding="utf-8") as f:
                profile = json.load(f)
        except (OSError, ValueError, RecursionError) as e:
            raise CMLoRAError(node, "profile_file", f"could not read {profile_file} ({type(e).__name__}).",
                              "pick a file written by CMLoRA Save Profile.") from e
        return io.NodeOutput(check_profile(profile, node))
