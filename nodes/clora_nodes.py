"""CLoRA nodes: the Attention Masker (patched model), the masks it found (MASK + overlay), and masks
saved and loaded so a layout is kept across runs."""
from __future__ import annotations

import logging
import os
import re

import safetensors.torch
import torch
import torch.nn.functional as F

from ..cmlora_core.clora import MORPHOLOGY, USER_MASK_MODES, token_positions
from ..cmlora_core.errors import CMLoRAError
from ..cmlora_core.stack import require_model_entries
from . import host
from .clora_runtime import Branches, CLoRARuntime, CLoRASettings, attach_clora, attention_layers
from .checks import check_inputs, check_mask_values, save_path, saved_files, saved_folder
from .host import io
from .loras import map_clip_lora, map_model_lora
from .plots import PALETTE, draw_mask_legend, mask_legend
from .runtime import runtime_of
from .stack_nodes import Stack

log = logging.getLogger("cmlora")
NODE = "CLoRA Attention Masker"


def _with_trigger(prompt: str, concept: str, trigger: str) -> str:
    """The prompt with the first whole-word occurrence of ``concept`` written with ``trigger``."""
    if not trigger:
        return prompt
    replacement = f"{trigger} {concept}"  # literal text: a trigger may hold backslashes or '$'
    return re.sub(rf"(?<!\w){re.escape(concept)}(?!\w)", lambda _: replacement, prompt, count=1, flags=re.IGNORECASE)


def _clip_with(clip, entries, node):
    """A CLIP with the text-encoder weights of ``entries`` merged (entries without any are logged)."""
    out = clip.clone()
    for e in entries:
        mapped = map_clip_lora(clip, e, node)
        if mapped is None:
            log.info("CLoRA: '%s' has no text-encoder weights; its prompt is encoded with the base CLIP", e.name)
        else:
            out.add_patches(mapped.patches, e.strength_clip)
    return out


def build_branches(clip, prompt, subjects, styles, node=NODE):
    """Encode the base prompt and each subject's variation; locate every concept's tokens."""
    if not prompt.strip():
        raise CMLoRAError(node, "prompt", "the prompt is empty.", "write the prompt that names every subject.")
    concepts = []
    for e in subjects:
        if not e.concept.strip():
            raise CMLoRAError(node, "stack", f"LoRA '{e.name}' has no concept words.",
                              "set its 'concept' on the LoRA Stack node to the prompt words it depicts, e.g. 'cat' "
                              "(or give it the category 'style' to apply it everywhere).")
        concepts.append(e.concept.strip())
    word_ids = [host.word_tokens(clip, c) for c in concepts]
    # in LoRA i's variation its concept is written with the trigger ("sks cat"): the trigger's tokens
    # belong to the concept's group there (the reference's groups include them)
    triggered = [host.word_tokens(clip, f"{e.trigger} {c}") if e.trigger else w
                 for c, e, w in zip(concepts, subjects, word_ids)]
    texts = [prompt] + [_with_trigger(prompt, c, e.trigger) for c, e in zip(concepts, subjects)]
    contexts, tokens = [], []
    for p, text in enumerate(texts):
        ids = host.tokens_of(clip, text)
        found = {}
        for c, (concept, wid) in enumerate(zip(concepts, word_ids)):
            pos = token_positions(ids, triggered[c]) if p == c + 1 else []
            pos = pos or token_positions(ids, wid)
            if not pos:
                raise CMLoRAError(node, "prompt", f"the concept '{concept}' (LoRA '{subjects[c].name}') is not in the "
                                  f"prompt '{text}'.", f"write '{concept}' in the prompt, or change the LoRA's concept.")
            found[c] = pos
        tokens.append(found)
        branch_clip = _clip_with(clip, styles + ([subjects[p - 1]] if p else []), node)
        cond, _ = host.encode(branch_clip, text)
        contexts.append(cond)
        if len(ids) > 77:
            log.info("CLoRA: the prompt spans %d CLIP chunks; concept tokens are read across chunks", len(ids) // 77)
    return texts, contexts, tokens, concepts


def _chosen_subjects(text: str, concepts: list[str]) -> tuple[int, ...]:
    """Indices of the subjects named (by concept words, comma-separated) in ``style_subjects``."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    lowered = [c.lower() for c in concepts]
    chosen = []
    for n in names:
        if n.lower() not in lowered:
            raise CMLoRAError(NODE, "style_subjects", f"'{n}' is not the concept of a subject LoRA (they are: "
                              f"{', '.join(concepts)}).", "write the concept words as set on the LoRA Stack nodes.")
        chosen.append(lowered.index(n.lower()))
    return tuple(sorted(set(chosen)))


def _user_masks(masks, mode: str, concepts: list[str]) -> torch.Tensor | None:
    """The artist's masks as (N or N*b, H, W) on the CPU, checked against the subjects; None without."""
    if masks is None:
        if mode != "replace":
            raise CMLoRAError(NODE, "mask_mode", f"mask_mode '{mode}' changes your masks, but 'masks' is not connected.",
                              "connect masks (one per subject LoRA), or set mask_mode back to 'replace'.")
        return None
    masks = masks.detach().to("cpu", torch.float32)
    masks = masks[None] if masks.ndim == 2 else masks
    check_mask_values(masks, NODE, "masks", "connect MASK outputs (values 0 to 1) of the image's size.")
    n = len(concepts)
    if masks.ndim != 3 or masks.shape[0] % n:
        raise CMLoRAError(NODE, "masks", f"got {masks.shape[0] if masks.ndim == 3 else 'a'} mask(s) of shape "
                          f"{list(masks.shape)} for {n} subject LoRAs ({', '.join(concepts)}).",
                          f"give one mask per subject LoRA in stack order ({n}), e.g. batch them with the host's "
                          "mask nodes or use CLoRA Load Masks.")
    if mode in ("replace", "limit"):
        k = masks.shape[0] // n
        empty = [concepts[i // k] for i in range(masks.shape[0]) if not bool((masks[i] >= 0.5).any())]
        if empty:
            raise CMLoRAError(NODE, "masks", f"the mask of {', '.join(sorted(set(empty)))} is empty, so with mask_mode "
                              f"'{mode}' that LoRA would act nowhere.",
                              "paint its region (at least half-white pixels), or use mask_mode 'add'.")
    return masks


class AttentionMasker(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return host.schema(
            node_id="CLoRA_AttentionMasker",
            search_aliases=['clora', 'contrastive lora', 'lora masks', 'multi character lora'],
            display_name="CLoRA Attention Masker",
            category="sampling/cmlora",
            description="Keeps subject LoRAs apart (a cat LoRA and a dog LoRA give a cat and a dog): while sampling, "
                        "nudges the latent so each concept's cross-attention separates, then confines each LoRA to "
                        "the region its concept attends to. Sample the output model with KSampler (euler or ddim).",
            inputs=[
                io.Model.Input("model", tooltip="The base model."),
                io.Clip.Input("clip", tooltip="The base text encoder; each branch is encoded with its LoRA merged."),
                Stack.Input("stack", tooltip="Subject LoRAs with their 'concept' words (and triggers); "
                                             "style-category LoRAs apply everywhere."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="The base prompt naming every subject's concept words, e.g. 'a cat and a dog'."),
                io.Float.Input("temperature", default=0.5, min=0.01, max=10.0, step=0.01,
                               tooltip="Temperature of the contrastive (NT-Xent) loss.", **host.ADVANCED),
                io.Float.Input("step_size", default=20.0, min=0.0, max=1000.0, step=0.5,
                               tooltip="Latent update step (the paper's 20); 0 keeps the masks but skips updates."),
                io.Float.Input("stop_fraction", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Update the latent during this first fraction of the steps.", **host.ADVANCED),
                io.Int.Input("extra_iterations", default=20, min=0, max=200,
                             tooltip="Extra update iterations at 0%, 10% and 20% of the steps.", **host.ADVANCED),
                io.Float.Input("mask_threshold", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="A pixel joins a LoRA's mask where its concept's attention exceeds this "
                                       "fraction of the maximum."),
                io.Combo.Input("attention", options=["conditional", "both"], default="conditional",
                               tooltip="Masks from the conditional pass only, or averaged with the unconditional one "
                                       "(the reference code).", **host.ADVANCED),
                io.Combo.Input("style_scope", options=["global", "subjects"], default="global",
                               tooltip="Style LoRAs apply everywhere, or only inside the subjects' masks.", **host.ADVANCED),
                io.Combo.Input("mask_morphology", options=list(MORPHOLOGY), default="none", optional=True,
                               tooltip="3x3 clean-up of each subject's mask: dilate grows it by a pixel, erode shrinks "
                                       "it, open drops specks, close fills pinholes.", **host.ADVANCED),
                io.String.Input("style_subjects", default="", optional=True,
                                tooltip="With style_scope 'subjects': the concept words of the subjects whose regions "
                                        "get the style LoRAs, comma-separated (empty: every subject).", **host.ADVANCED),
                io.Mask.Input("masks", optional=True,
                              tooltip="Your own masks, one per subject LoRA in stack order (e.g. from CLoRA Load "
                                      "Masks, or the host's mask editor), at the image's aspect ratio."),
                io.Combo.Input("mask_mode", options=list(USER_MASK_MODES), default="replace", optional=True,
                               tooltip="With masks: 'replace' uses your masks instead of the ones found from attention; "
                                       "'add' joins them; 'limit' keeps the found masks only inside yours."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model to sample (euler or ddim for exact updates)."),
                io.Conditioning.Output(display_name="positive",
                                       tooltip="The base prompt, encoded; wire it to the sampler's positive."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, stack, prompt, temperature, step_size, stop_fraction, extra_iterations,
                mask_threshold, attention, style_scope, mask_morphology="none", style_subjects="", masks=None,
                mask_mode="replace"):
        check_inputs(cls, locals())
        entries = list(require_model_entries(stack, NODE))
        attention_layers(model.model.diffusion_model)  # a UNet with cross-attention, before encoding anything
        masked = [e.name for e in entries if e.mask is not None]
        if masked:
            raise CMLoRAError(NODE, "stack", f"LoRA {', '.join(repr(n) for n in masked)} has a mask from its stack node; "
                              "CLoRA finds each subject's region from attention itself.",
                              "disconnect it from the stack node and give your masks to this node's 'masks' input "
                              "(one per subject LoRA).")
        subjects = [e for e in entries if e.category != "style"]
        styles = [e for e in entries if e.category == "style"]
        if not subjects:
            raise CMLoRAError(NODE, "stack", "every LoRA in the stack is a style LoRA; CLoRA needs subjects.",
                              "set the subject LoRAs' category (character, object, ...) and concept words.")
        texts, contexts, tokens, concepts = build_branches(clip, prompt, subjects, styles)
        ordered = subjects + styles
        mapped = [map_model_lora(model, e, NODE) for e in ordered]
        branches = Branches(contexts=[c.detach() for c in contexts], concept_tokens=tokens,
                            subject_loras=list(range(len(subjects))),
                            style_loras=list(range(len(subjects), len(ordered))), concept_names=concepts)
        chosen = _chosen_subjects(style_subjects, concepts)
        if chosen and style_scope != "subjects":
            raise CMLoRAError(NODE, "style_subjects", f"style_subjects names subjects, but style_scope is '{style_scope}'.",
                              "set style_scope to 'subjects', or clear style_subjects.")
        drawn = _user_masks(masks, mask_mode, concepts)
        settings = CLoRASettings(temperature, step_size, stop_fraction, extra_iterations, mask_threshold, attention,
                                 style_scope, chosen, mask_morphology, drawn, mask_mode)
        clone = attach_clora(model, mapped, branches, settings)
        for t in texts:
            log.info("CLoRA branch prompt: %s", t)
        base_cond, pooled = host.encode(_clip_with(clip, styles, NODE), prompt)
        return io.NodeOutput(clone, [[base_cond, {"pooled_output": pooled}]])


def _overlay(masks: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
    """masks (N, b, H, W) -> IMAGE (b, H, W, 3): each LoRA's region tinted over the image (or grey)."""
    n, b, h, w = masks.shape
    base = image if image is not None else torch.full((b, h, w, 3), 0.5)
    out = base.clone().float()
    for i in range(n):
        colour = torch.tensor(PALETTE[i % len(PALETTE)], dtype=torch.float32) / 255.0
        m = masks[i][..., None].float()
        out = out * (1 - 0.5 * m) + colour * 0.5 * m
    return out.clamp(0, 1)


class MaskOutput(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return host.schema(
            node_id="CLoRA_Masks",
            search_aliases=['clora masks', 'lora attention mask'],
            display_name="CLoRA Masks",
            category="sampling/cmlora",
            description="The per-LoRA masks the CLoRA Attention Masker used in its last run, as MASKs and as an "
                        "overlay; pick a step to debug, or -1 for the last step.",
            inputs=[
                io.Model.Input("model", tooltip="The model from CLoRA Attention Masker that was sampled."),
                io.Latent.Input("samples", tooltip="The sampler's output (so this node runs after sampling)."),
                io.Int.Input("step", default=-1, min=-1, max=10000, tooltip="The step whose masks to show; -1 = last."),
                io.Image.Input("image", optional=True, tooltip="The decoded image to draw the masks over."),
            ],
            outputs=[
                io.Mask.Output(display_name="masks", tooltip="One mask per subject LoRA (and batch image), "
                                                             "in stack order, at image size."),
                io.Image.Output(display_name="overlay", tooltip="The masks tinted over the image."),
            ],
        )

    @classmethod
    def execute(cls, model, samples, step, image=None):
        node = check_inputs(cls, locals())
        runtime = runtime_of(model)
        if not isinstance(runtime, CLoRARuntime):
            raise CMLoRAError(node, "model", "this model does not come from a CLoRA Attention Masker.",
                              "connect the model output of CLoRA Attention Masker.")
        if runtime.last_clora is None:
            raise CMLoRAError(node, "samples", "the masked model has not been sampled yet.",
                              "connect the sampler's LATENT output to 'samples'.")
        run = runtime.run_of(samples["samples"])
        if run is None:
            raise CMLoRAError(node, "samples", "these samples were not made by a recent run of this model, so its masks "
                              f"would belong to another image (its last run made a latent of shape "
                              f"{list(runtime.last_clora.latent.shape) if runtime.last_clora.latent is not None else '?'}, "
                              f"these are {list(samples['samples'].shape)}).",
                              "connect the LATENT output of the sampler that sampled this model, unchanged.")
        if not run.masks:
            raise CMLoRAError(node, "samples", "the run that made these samples recorded no masks.",
                              "sample the masked model with at least one step.")
        steps = sorted(run.masks)
        if step != -1 and step not in run.masks:
            raise CMLoRAError(node, "step", f"no masks for step {step}; the run has steps {steps[0]}..{steps[-1]}.",
                              "pick a step in that range, or -1.")
        masks = run.masks[steps[-1] if step == -1 else step]  # (N, b, h, w) latent size
        n, b = masks.shape[:2]
        if image is not None:
            if image.shape[0] != b:
                raise CMLoRAError(node, "image", f"the image batch has {image.shape[0]} images, the masks {b}.",
                                  "connect the decoded image of these samples (VAE Decode of the same LATENT).")
            size = tuple(image.shape[1:3])
        else:
            size = (masks.shape[-2] * 8, masks.shape[-1] * 8)
        up = F.interpolate(masks.reshape(n * b, 1, *masks.shape[-2:]).float(), size=size, mode="nearest")
        up = up.reshape(n, b, *size)
        # which colour is which subject LoRA: drawn on the overlay and shown as the node's text
        labels = [f"{concept} ({ml.entry.name.rsplit('.', 1)[0]})" for concept, ml in
                  zip(runtime.branches.concept_names, (runtime.loras[i] for i in runtime.branches.subject_loras))]
        legend = "Overlay colours: " + "; ".join(mask_legend(labels))
        overlay = draw_mask_legend(_overlay(up, image), labels, short=list(runtime.branches.concept_names))
        return io.NodeOutput(up.reshape(n * b, *size), overlay,
                             ui=host.ui.PreviewText(legend))


MASK_DIR = "clora_masks"


class SaveMasks(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return host.schema(
            node_id="CLoRA_SaveMasks",
            search_aliases=['save clora masks', 'save lora masks'],
            display_name="CLoRA Save Masks",
            category="sampling/cmlora",
            description="Keeps a good layout: writes masks (e.g. CLoRA Masks' output) to output/clora_masks, to give "
                        "them back to CLoRA Attention Masker in later runs through CLoRA Load Masks.",
            inputs=[
                io.Mask.Input("masks", tooltip="The masks to keep, one per subject LoRA (CLoRA Masks' 'masks')."),
                io.String.Input("filename", default="clora_masks",
                                tooltip="File name (without .safetensors) in output/clora_masks; an existing file of "
                                        "that name is replaced."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, masks, filename):
        node = check_inputs(cls, locals())
        masks = masks[None] if masks.ndim == 2 else masks
        check_mask_values(masks, node, "masks", "connect a MASK output, e.g. CLoRA Masks' 'masks'.")
        path = save_path(node, "filename", filename, "clora_masks", MASK_DIR, ".safetensors")
        safetensors.torch.save_file({"masks": masks.detach().to("cpu", torch.float32).contiguous()}, path,
                                    metadata={"format": "clora_masks"})
        return io.NodeOutput(ui=host.ui.PreviewText(f"saved {masks.shape[0]} masks of "
                                                    f"{masks.shape[2]}x{masks.shape[1]} to {path}"))


class LoadMasks(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return host.schema(
            node_id="CLoRA_LoadMasks",
            search_aliases=['load clora masks', 'load lora masks'],
            display_name="CLoRA Load Masks",
            category="sampling/cmlora",
            description="Reads masks saved by CLoRA Save Masks; connect them to CLoRA Attention Masker's 'masks' "
                        "to keep a layout (mask_mode 'replace') or to steer the one it finds ('add', 'limit').",
            inputs=[io.Combo.Input("masks_file", options=saved_files(MASK_DIR, ".safetensors"),
                                   tooltip="A file from output/clora_masks.")],
            outputs=[io.Mask.Output(display_name="masks", tooltip="The saved masks, in the order they were saved.")],
        )

    @classmethod
    def fingerprint_inputs(cls, masks_file):
        known = masks_file in saved_files(MASK_DIR, ".safetensors")
        return os.path.getmtime(os.path.join(saved_folder(MASK_DIR), masks_file)) if known else masks_file

    @classmethod
    def execute(cls, masks_file):
        node = check_inputs(cls, locals())  # the name is one of the folder's files
        path = os.path.join(saved_folder(MASK_DIR), masks_file)
        try:
            masks = host.load_file(path)["masks"]
        except Exception as e:  # a broken or foreign file: any reader error is the same mistake
            raise CMLoRAError(node, "masks_file", f"could not read masks from {masks_file} ({type(e).__name__}).",
                              "pick a file written by CLoRA Save Masks.") from e
        if masks.ndim != 3 or not masks.is_floating_point():
            raise CMLoRAError(node, "masks_file", f"{masks_file} holds a {masks.dtype} tensor of shape "
                              f"{list(masks.shape)}, not masks.", "pick a file written by CLoRA Save Masks.")
        check_mask_values(masks, node, "masks_file", "pick a file written by CLoRA Save Masks.")
        return io.NodeOutput(masks.float())
