"""LoRA files as the host sees them: reading, mapping onto a model or CLIP, validation."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..cmlora_core.errors import CMLoRAError
from ..cmlora_core.lora_file import FileCache, LoraFileInfo, classify, guess_base, read_metadata, trigger_from_metadata
from ..cmlora_core.stack import LoraEntry
from . import host
from .checks import shown

log = logging.getLogger("cmlora")

# Loaded LoRA files, bounded by their tensors' bytes (a stack is read once per prompt by the stack
# node and again where it is applied); one file larger than the budget is still kept alone.
FILE_CACHE_BYTES = 1 << 30
_FILES = FileCache(budget=FILE_CACHE_BYTES, size=lambda lf: lf.nbytes)
_TE_PREFIXES = ("lora_te", "text_encoder", "text_encoders.", "te_", "te1", "te2")


@dataclass
class LoraFile:
    tensors: dict
    info: LoraFileInfo
    nonfinite: list[str]  # keys of tensors holding NaN or inf
    empty: list[str]  # keys of tensors with no elements (a rank-0 factor)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _read(path: str) -> LoraFile:
    tensors = host.load_file(path)
    metadata = read_metadata(path)
    fmt, rank, has_te, has_conv = classify(tensors)
    info = LoraFileInfo(path=path, format=fmt, rank=rank, n_tensors=len(tensors), has_text_encoder=has_te,
                        has_conv=has_conv, trigger=trigger_from_metadata(metadata), metadata=metadata)
    nonfinite = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    empty = [k for k, t in tensors.items() if t.numel() == 0]
    return LoraFile(tensors, info, nonfinite, empty)


def lora_file_path(name, node: str, input: str = "lora_name") -> str:
    """The file of a LoRA name, looked up only inside the host's loras folders.

    Anything else (an absolute path, a path leaving the folder, a name that is not text) gets
    one message that says nothing about what exists elsewhere on the disk."""
    path = host.lora_path(name)
    if path is None:
        raise CMLoRAError(node, input, f"{shown(name)} is not a LoRA file in the loras folder.",
                          "pick a file from the list; new files go in ComfyUI/models/loras (or a folder listed in "
                          "extra_model_paths.yaml), then refresh.")
    return path


def load_lora_file(name, node: str, input: str = "lora_name") -> LoraFile:
    """Read and check the LoRA file ``name`` names in the loras folder (cached by path, size and mtime)."""
    return read_lora(lora_file_path(name, node, input), name, node, input)


def read_lora(path: str, name: str, node: str, input: str) -> LoraFile:
    """Read and check a LoRA file at a path the loras-folder lookup returned."""
    try:
        lf = _FILES.get(path, _read)
    except Exception as e:  # the host's loader raises many types for a damaged file
        raise CMLoRAError(node, input, f"LoRA file '{name}' could not be read ({type(e).__name__}: {e}).",
                          "the file is damaged or incomplete; download it again.") from e
    if lf.nonfinite:
        raise CMLoRAError(node, input, f"LoRA file '{name}' holds NaN or infinite values in {len(lf.nonfinite)} of its "
                          f"tensors (e.g. {lf.nonfinite[0]}); it would turn every image into noise or black.",
                          "the file is damaged; download it again or pick another LoRA.")
    if lf.empty:
        raise CMLoRAError(node, input, f"LoRA file '{name}' has empty tensors (e.g. {lf.empty[0]}: rank 0); "
                          "it changes nothing.", "pick another LoRA; this file was saved without weights.")
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
        weight, offset, _ = host.patch_key(key)
        if weight not in shapes:
            continue
        target = list(shapes[weight])
        if offset is not None:  # a slice of a fused layer: (dimension, first index, count)
            dim, first, count = offset
            if first + count > target[dim]:
                bad.append((f"{weight}[{first}:{first + count}]", tuple(target), "a slice past its end"))
                continue
            target[dim] = count
        factors = host.lora_factors(patch)
        if factors is None or factors.reshape is not None or factors.mid is not None:  # the host handles them
            continue
        if factors.up.shape[0] != target[0] or factors.down[0].numel() != torch.Size(target[1:]).numel():
            shown_key = weight if offset is None else f"{weight}[{offset[1]}:{offset[1] + offset[2]}]"
            bad.append((shown_key, tuple(target), (factors.up.shape[0], factors.down[0].numel())))
    if bad:
        key, target, got = bad[0]
        raise CMLoRAError(
            node, "stack",
            f"LoRA '{name}' does not fit this {family} model: {len(bad)} of its layers have the wrong shape "
            f"(e.g. {key}: model {target}, LoRA {got})" + (f"; the file looks like a {base_hint} LoRA." if base_hint else "."),
            f"use a LoRA trained for {family}.")


def map_model_lora(model, entry: LoraEntry, node: str) -> MappedLora:
    lf = read_lora(entry.path, entry.name, node, "stack")
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
    lf = read_lora(entry.path, entry.name, node, "stack")
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
