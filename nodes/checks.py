"""Run-time checks of a node's inputs against its own schema and the host's lists.

The host validates some inputs when a prompt is queued, but not all of them on every host
version (an API prompt may carry a combo value that is not among the options, "nan" for a
float, or a literal where a MODEL belongs). Every node of the pack calls ``check_inputs``
first, so such a value becomes one clear error naming the node, the input and the fix
instead of a wrong image or a raw exception further down.
"""
from __future__ import annotations

import math
import numbers
import os
import re

import torch

from ..cmlora_core.cmlora import Schedule
from ..cmlora_core.errors import CMLoRAError
from ..cmlora_core.stack import LoraStack
from . import host

MAX_TEXT = 20_000  # characters of a text input (prompts are far shorter)


def _conditioning(v) -> bool:
    return isinstance(v, list) and all(isinstance(c, (list, tuple)) and len(c) >= 2 and torch.is_tensor(c[0])
                                       and isinstance(c[1], dict) for c in v)


# io type -> (test, what to connect)
_LINKED = {
    "MODEL": (lambda v: isinstance(v, host.ModelPatcher), "a MODEL output, e.g. Load Checkpoint's"),
    "CLIP": (lambda v: isinstance(v, host.CLIP), "a CLIP output, e.g. Load Checkpoint's"),
    "VAE": (lambda v: isinstance(v, host.VAE), "a VAE output, e.g. Load Checkpoint's"),
    "CONDITIONING": (_conditioning, "a CONDITIONING output, e.g. CLIP Text Encode's"),
    "LATENT": (lambda v: isinstance(v, dict) and torch.is_tensor(v.get("samples")),
               "a LATENT output, e.g. Empty Latent Image's or a sampler's"),
    "IMAGE": (lambda v: torch.is_tensor(v) and v.ndim == 4, "an IMAGE output, e.g. VAE Decode's"),
    "MASK": (lambda v: torch.is_tensor(v) and v.ndim in (2, 3),
             "a MASK output, e.g. Load Image's mask or CLoRA Load Masks'"),
    "CMLORA_STACK": (lambda v: isinstance(v, LoraStack), "the stack output of a 'CMLoRA LoRA Stack' node"),
    "CMLORA_SCHEDULE": (lambda v: isinstance(v, Schedule), "the schedule output of 'CMLoRA Frequency Scheduler'"),
    "CMLORA_PROFILE": (lambda v: isinstance(v, dict), "the profile output of the LoRA Profiler or Load Profile"),
    "LORA_STACK": (lambda v: isinstance(v, (list, tuple)), "the LORA_STACK output of a LoRA stacker node"),
}


def shown(value, limit: int = 60) -> str:
    """A value as an error message may quote it: a scalar's repr cut to ``limit`` characters, else its type
    (containers from API prompts can be huge or nested past the recursion limit)."""
    if isinstance(value, str):
        text = repr(value[:limit])
    elif isinstance(value, (int, float, bool, type(None))):
        text = repr(value)
    else:
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_number(node: str, name: str, value, low=None, high=None, integer: bool = False, what: str = ""):
    """``value`` as a finite number within [low, high], else the pack's error (``what``: the value, when
    it is one part of the input ``name``)."""
    kind = "a whole number" if integer else "a number"
    what = what or name
    ok = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
    if not ok or not math.isfinite(value):
        raise CMLoRAError(node, name, f"{what} must be {kind}, got {shown(value)}.", f"set {what} to {kind}.")
    if (low is not None and value < low) or (high is not None and value > high):
        raise CMLoRAError(node, name, f"{what} is {value}, outside {low}..{high}.", f"set {what} within {low}..{high}.")
    return value


def check_value(node: str, inp, value) -> None:
    """One input's value against its schema entry."""
    name, io_type = inp.id, inp.io_type
    if io_type == "COMBO":
        options = list(inp.options or [])
        if not isinstance(value, (str, int)) or isinstance(value, bool) or value not in options:
            listed = ", ".join(map(str, options[:12])) + (", ..." if len(options) > 12 else "")
            raise CMLoRAError(node, name, f"{shown(value)} is not one of its options.",
                              f"choose one of: {listed}." if options else "refresh the node's list (press R).")
    elif io_type in ("INT", "FLOAT"):
        check_number(node, name, value, getattr(inp, "min", None), getattr(inp, "max", None), io_type == "INT")
    elif io_type == "BOOLEAN":
        if not isinstance(value, bool):
            raise CMLoRAError(node, name, f"expects true or false, got {shown(value)}.", f"set {name} to true or false.")
    elif io_type == "STRING":
        if not isinstance(value, str):
            raise CMLoRAError(node, name, f"expects text, got {shown(value)}.", f"type text into {name}.")
        if "\x00" in value or len(value) > MAX_TEXT:
            raise CMLoRAError(node, name, "the text holds a NUL character or is longer than "
                              f"{MAX_TEXT} characters.", f"shorten or retype {name}.")
    elif io_type in _LINKED:
        test, source = _LINKED[io_type]
        if not test(value):
            raise CMLoRAError(node, name, f"expects {io_type}, got {type(value).__name__}.", f"connect {source}.")


def check_inputs(cls, values: dict, looked_up: tuple[str, ...] = ()) -> str:
    """Check every input a node received (``values``: its execute arguments); return the node's display name.

    ``looked_up``: combo inputs the node resolves with the host's own lookup (file names), which
    gives its own message."""
    schema = cls.define_schema()
    node = schema.display_name
    for inp in schema.inputs:
        if inp.id in looked_up:
            continue
        if inp.id in values and not (inp.optional and values[inp.id] is None):
            check_value(node, inp, values[inp.id])
    return node


def check_mask_values(masks, node: str, input: str, fix: str) -> None:
    """Masks with pixels, every value finite and within 0..1, or a clear error."""
    if masks.numel() == 0:
        raise CMLoRAError(node, input, f"the masks have no pixels (shape {'x'.join(map(str, masks.shape))}).",
                          fix + " A crop past the image's edge leaves an empty mask.")
    if not bool(torch.isfinite(masks).all()) or float(masks.min()) < 0 or float(masks.max()) > 1:
        raise CMLoRAError(node, input, "the masks hold values that are not numbers (NaN, infinite) or lie outside "
                          "0..1.", fix)


# ------------------------------------------------------------------ files the pack saves

_SAFE_NAME = re.compile(r"[\w][\w .-]{0,99}")
MAX_NAME_BYTES = 255  # the limit of a file name in bytes on Linux file systems (ext4 and most others)


def saved_folder(name: str) -> str:
    """A folder of the host's output directory where the pack saves files (profiles, masks)."""
    return os.path.join(host.output_directory(), name)


def _inside(folder: str, name: str) -> bool:
    """Whether ``name`` in ``folder`` is a file that stays in it once links are followed."""
    real_folder = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(folder, name))
    return os.path.dirname(path) == real_folder and os.path.isfile(path)


def saved_files(name: str, suffix: str) -> list[str]:
    """The files ending in ``suffix`` in the output folder ``name``, sorted (none when it does not exist);
    a link that leads out of the folder is not one of them."""
    folder = saved_folder(name)
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if f.endswith(suffix) and _inside(folder, f))


def save_path(node: str, input_name: str, filename: str, default: str, folder: str, suffix: str) -> str:
    """Where a save node writes ``filename``: a plain name (no folders) in the output folder, made if needed."""
    name = filename.strip() or default
    if not _SAFE_NAME.fullmatch(name):
        raise CMLoRAError(node, input_name, f"{shown(name)} is not a plain file name.",
                          "use up to 100 letters, digits, spaces, '-', '_' or '.', without folders.")
    if len(f"{name}{suffix}".encode()) > MAX_NAME_BYTES:
        raise CMLoRAError(node, input_name, f"{shown(name)} takes {len(name.encode())} bytes, more than a file "
                          f"name may (at most {MAX_NAME_BYTES - len(suffix.encode())} bytes in UTF-8).",
                          "use a shorter name (letters outside ASCII take 2 to 4 bytes each).")
    os.makedirs(saved_folder(folder), exist_ok=True)
    return os.path.join(saved_folder(folder), f"{name}{suffix}")
