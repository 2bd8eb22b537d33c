"""LoRA files as the host sees them: reading, mapping onto a model or CLIP, validation."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from ..cmlora_core.errors import CMLoRAError
from ..cmlora_core.lora_file import FileCache, LoraFileInfo, classify, guess_base, read_metadata, trigger_from_metadata
from ..cmlora_core.stack import LoraEntry
from . import host

log = logging.getLogger("cmlora")

_FILES = FileCache(capacity=16)
_TE_PREFIXES = ("lora_te", "text_encoder", "text_encoders.", "te_", "te1", "te2")


@dataclass
class LoraFile:
    tensors: dict
    info: LoraFileInfo


def _read(path: str) -> LoraFile:
    tensors = host.load_file(path)
    metadata = read_metadata(path)
    fmt, rank, has_te, has_conv = classify(tensors)
    info = LoraFileInfo(path=path, format=fmt, rank=rank, n_tensors=len(tensors), has_text_encoder=has_te,
                        has_conv=has_conv, trigger=trigger_from_metadata(metadata), metadata=metadata)
    return LoraFile(tensors, info)


def load_lora_file(name: str, node: str, input: str = "lora_name") -> LoraFile:
    """Read (cached by path, size and mtime) and sanity-check a LoRA file from the loras folder."""
    path = host.lora_path(name) if not os.path.isabs(name) else name
    if path is None or not os.path.isfile(path):
        raise CMLoRAError(node, input, f"LoRA file '{name}' was not found in the loras folder.",
                          "put the file in ComfyUI/models/loras (or a folder listed in extra_model_paths.yaml) and refresh.")
    try:
        lf = _FILES.get(path, _read)
    except Exception as e:  # the host's loader raises many types for a damaged file
        raise CMLoRAError(node, input, f"LoRA file '{name}' could not be read ({type(e).__name__}: {e}).",
                          "the file is damaged or incomplete; download it again.") from e
    if lf.info.format == "unknown":
        sample = ", ".join(list(lf.tensors)[:3])
        raise CMLoRAError(node, input,
                          f"'{name}' holds no LoRA weights (none of its {lf.info.n_tensors} tensors, e.g. {sample}, "
                          "is a LoRA/LoCon/LoHa/LoKr factor). It may be a checkpoint, an embedding or a VAE.",
                          "pick a LoRA file; checkpoints go in a checkpoint loader.")
    return lf


@dataclass
class MappedLora:
    """A stack entry with its patches for one model, as ``LoraLoader`` would add them."""

    entry: LoraEntry
    patches: dict  # model key -> host adapter/patch
    unmapped: list[str]  # file keys the host could not place (text-encoder keys excluded)
    te_keys: int  # file keys left for the text encoder

    @property
    def n_mapped(self) -> int:
        return len(self.patches)

    def describe(self) -> str:
        info = self.entry.info
        text = f"'{self.entry.name}': {info.describe() if info else ''}; {self.n_mapped} model keys mapped"
        if self.unmapped:
            text += f", {len(self.unmapped)} file keys unmapped (e.g. {self.unmapped[0]})"
        return text


def _check_shapes(patches: dict, shapes: dict, name: str, node: str, base_hint: str, family: str) -> None:
    bad = []
    for key, patch in patches.items():
        if not isinstance(patch, host.LoRAAdapter) or not isinstance(key, str) or key not in shapes:
            continue
        up, down = patch.weights[0], patch.weights[1]
        target = shapes[key]
        if patch.weights[5] is not None or patch.weights[3] is not None:  # reshape/tucker: host handles
            continue
        if up.shape[0] != target[0] or down[0].numel() != torch.Size(target[1:]).numel():
            bad.append((key, tuple(target), (up.shape[0], down[0].numel())))
    if bad:
        key, target, got = bad[0]
        raise CMLoRAError(
            node, "stack",
            f"LoRA '{name}' does not fit this {family} model: {len(bad)} of its layers have the wrong shape "
            f"(e.g. {key}: model {target}, LoRA {got})" + (f"; the file looks like a {base_hint} LoRA." if base_hint else "."),
            f"use a LoRA trained for {family}.")


def map_model_lora(model, entry: LoraEntry, node: str) -> MappedLora:
    lf = load_lora_file(entry.path, node, "stack")
    patches, not_loaded = host.map_lora(lf.tensors, host.unet_key_map(model))
    te = [k for k in not_loaded if k.startswith(_TE_PREFIXES)]
    unmapped = [k for k in not_loaded if not k.startswith(_TE_PREFIXES)]
    family = host.model_family(model)
    hint = guess_base(lf.tensors)
    if not patches:
        if te and not unmapped:
            raise CMLoRAError(node, "stack",
                              f"LoRA '{entry.name}' only has text-encoder weights; it changes nothing in the diffusion model.",
                              "set its strength_model to 0 (it still applies through 'CMLoRA Apply CLIP').")
        raise CMLoRAError(
            node, "stack",
            f"LoRA '{entry.name}' matched 0 of its {len(unmapped)} keys on this {family} model"
            + (f" — it looks like a {hint} LoRA." if hint else " — it was made for another base model."),
            f"use a LoRA trained for {family}, or load the matching checkpoint.")
    _check_shapes(patches, host.model_state_shapes(model), entry.name, node, hint, family)
    if unmapped:
        log.warning("CMLoRA: %d keys of '%s' do not map onto this model and are ignored (e.g. %s)",
                    len(unmapped), entry.name, unmapped[0])
    return MappedLora(entry, patches, unmapped, len(te))


def map_clip_lora(clip, entry: LoraEntry, node: str) -> MappedLora | None:
    """The text-encoder half of a LoRA, or None when the file has none (logged)."""
    lf = load_lora_file(entry.path, node, "stack")
    patches, not_loaded = host.map_lora(lf.tensors, host.clip_key_map(clip))
    te_unmapped = [k for k in not_loaded if k.startswith(_TE_PREFIXES)]
    if not patches:
        if te_unmapped:
            hint = guess_base(lf.tensors)
            raise CMLoRAError(node, "stack",
                              f"the text-encoder weights of LoRA '{entry.name}' match none of this CLIP's layers"
                              + (f"; it looks like a {hint} LoRA." if hint else "."),
                              "use a LoRA trained for this checkpoint's text encoder.")
        log.info("CMLoRA: '%s' has no text-encoder weights; the prompt encoding is unchanged by it", entry.name)
        return None
    _check_shapes(patches, host.clip_state_shapes(clip), entry.name, node, guess_base(lf.tensors), "text encoder")
    return MappedLora(entry, patches, te_unmapped, 0)
