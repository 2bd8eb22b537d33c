"""Reading LoRA files: tensors, training metadata, format and rank, cached by file identity.

Only safetensors/torch; the mapping of file keys onto a model is the host's job (it knows
every naming scheme) and happens in the node glue.
"""
from __future__ import annotations

import json
import os
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import torch

# Suffixes that mark a tensor as part of a LoRA-family adapter, by format.
_FORMAT_SUFFIXES = (
    ("loha", (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b")),
    ("lokr", (".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b")),
    ("glora", (".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight")),
    ("oft", (".oft_blocks", ".oft_diag")),
    ("peft", (".lora_A.weight", ".lora_B.weight", ".lora.down.weight", ".lora.up.weight",
              ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight", "_lora.down.weight")),
    ("kohya", (".lora_down.weight", ".lora_up.weight")),
    ("diff", (".diff", ".diff_b", ".w_norm", ".b_norm", ".set_weight")),
)
_DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight",
                  ".lora_linear_layer.down.weight", "_lora.down.weight", ".hada_w1_b", ".lokr_w2_b")


@dataclass(frozen=True)
class LoraFileInfo:
    """What a LoRA file is, independent of the model it is applied to."""

    path: str
    format: str  # kohya | locon | peft | loha | lokr | glora | oft | diff | mixed | unknown
    rank: int | None  # most common rank of the low-rank factors, None when not low-rank
    n_tensors: int
    has_text_encoder: bool
    has_conv: bool
    trigger: str  # trigger words from the training metadata, "" when none
    metadata: dict = field(default_factory=dict, compare=False, repr=False)

    def describe(self) -> str:
        rank = f"rank {self.rank}" if self.rank else "full-rank factors"
        te = ", text encoder" if self.has_text_encoder else ", no text encoder"
        return f"{self.format}, {rank}, {self.n_tensors} tensors{te}"


def classify(tensors: dict[str, torch.Tensor]) -> tuple[str, int | None, bool, bool]:
    """Format, rank, text-encoder presence and conv presence of a LoRA state dict."""
    formats = set()
    for key in tensors:
        for name, suffixes in _FORMAT_SUFFIXES:
            if key.endswith(suffixes):
                formats.add(name)
                break
    ranks: Counter = Counter()
    has_conv = False
    for key, t in tensors.items():
        if key.endswith(_DOWN_SUFFIXES) and t.ndim >= 2:
            ranks[int(t.shape[0])] += 1
        if t.ndim == 4 and t.shape[-1] > 1:
            has_conv = True
    has_te = any(k.startswith(("lora_te", "text_encoder", "text_encoders.", "te_", "te1", "te2"))
                 or "text_model" in k for k in tensors)
    if not formats:
        fmt = "unknown"
    elif len(formats) == 1:
        fmt = formats.pop()
        if fmt == "kohya" and has_conv:
            fmt = "locon"
    else:
        fmt = "mixed(" + "+".join(sorted(formats)) + ")"
    rank = ranks.most_common(1)[0][0] if ranks and fmt not in ("lokr",) else None
    return fmt, rank, has_te, has_conv


def trigger_from_metadata(metadata: dict) -> str:
    """Trigger words from kohya/modelspec training metadata, "" when the file has none.

    kohya's ``ss_tag_frequency`` maps dataset folders ("10_sks") to tag counts; the most
    frequent tag across folders is the usual trigger. ``modelspec.trigger_phrase`` wins.
    """
    phrase = metadata.get("modelspec.trigger_phrase") or metadata.get("trigger_words")
    if phrase:
        return str(phrase).strip()
    raw = metadata.get("ss_tag_frequency")
    if not raw:
        return ""
    try:
        folders = json.loads(raw)
    except (TypeError, ValueError):
        return ""
    counts: Counter = Counter()
    for tags in folders.values() if isinstance(folders, dict) else ():
        if isinstance(tags, dict):
            for tag, n in tags.items():
                if isinstance(n, (int, float)):
                    counts[tag.strip()] += n
    return counts.most_common(1)[0][0] if counts else ""


def read_metadata(path: str) -> dict:
    """The safetensors header's ``__metadata__`` (empty for other files)."""
    if not path.endswith(".safetensors"):
        return {}
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})


class FileCache:
    """An LRU of values read from files, keyed by (path, size, mtime) so that edits are picked up.

    Bounded by ``budget`` in the units of ``size(value)`` (bytes for loaded files; the default
    counts entries). The newest entry is kept even when it alone exceeds the budget.
    """

    def __init__(self, budget: int = 16, size=lambda value: 1):
        self.budget, self.size = budget, size
        self._items: OrderedDict = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    @staticmethod
    def identity(path: str) -> tuple:
        st = os.stat(path)
        return (os.path.realpath(path), st.st_size, st.st_mtime_ns)

    def get(self, path: str, load):
        key = self.identity(path)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = load(path)
        with self._lock:
            if key not in self._items:
                self._items[key] = value
                self._used += self.size(value)
            while self._used > self.budget and len(self._items) > 1:
                self._used -= self.size(self._items.popitem(last=False)[1])
        return value

    @property
    def used(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._used = 0


def guess_base(tensors: dict[str, torch.Tensor]) -> str:
    """A best guess of the base model a LoRA file was trained for ("" when unsure).

    Used only to word error messages: the cross-attention key projection's input width is
    the text embedding width (768 SD1.x, 1024 SD2.x, 2048 SDXL); SDXL files also carry two
    text encoders; the DiT models are told apart by the names of their blocks (Flux's
    double/single blocks, Qwen-Image's separate image and text MLPs, Z-Image's refiners and
    feed-forward w1..w3).
    """
    keys = list(tensors)
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in keys):
        return "SDXL"
    if any("to_qkv_mlp_proj" in k or "double_stream_modulation" in k for k in keys):
        return "Flux.2"
    if any("single_transformer_blocks" in k or "double_blocks" in k for k in keys):
        return "Flux"
    if any("img_mlp" in k or "txt_mlp" in k for k in keys):  # Flux's double blocks are caught above
        return "Qwen-Image"
    if any(("noise_refiner" in k or "context_refiner" in k or "feed_forward_w" in k or "feed_forward.w" in k)
           for k in keys):
        return "Z-Image (or Lumina 2)"
    for k in keys:
        if ("attn2" in k and ("to_k" in k or "to_v" in k)) and k.endswith(_DOWN_SUFFIXES):
            width = tensors[k].shape[-1]
            return {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}.get(int(width), "")
    return ""


def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes (the identity a profile records for each LoRA)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
