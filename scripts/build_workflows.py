"""Write the example workflows and their template-browser thumbnails into example_workflows/.

    .venv/bin/python scripts/build_workflows.py [--out DIR]

What the template browser reads. ComfyUI lists a pack's ``example_workflows/*.json`` at
GET /api/workflow_templates as bare file names, and its frontends (read in the bundles of
1.32.9 and 1.49.6) build each card from that name alone: the name is the card's title, the
same name with '-' and '_' as spaces its description, ``<name>.jpg`` its thumbnail, and the
name again the tab title once opened; nothing inside the file is read for the card (no
index.json for packs: an index.json here would be listed as one more workflow). So the file
names below are written as titles, and each thumbnail is a diagram drawn here with Pillow of
what its method does per step (deterministic: same code, same pictures).

Two kinds of example:
- "(demo)" examples use the random-weight checkpoint and LoRAs that scripts/make_fixtures.py
  makes; scripts/demo.sh and the end-to-end tests run every one of them through /prompt.
- The "SD1.5 -" and "SDXL -" examples name the usual base checkpoints and carry the frontend's
  model metadata on their loader (``properties.models`` = [{name, url, directory}], the
  fields ComfyUI's own templates use and both frontends read, offering the download), with
  LoRA file names that are placeholders (``YOUR_...``) and Note nodes saying what to change.
  They cannot run without those weights, so the demo and the tests leave them out (see
  ``model_downloads``).

Node layout. Nodes sit in columns; each node's height budget is the tallest it was measured
in either view of either frontend (classic canvas, and Nodes 2.0 where 1.32.9 also scales a
classic layout by 1.2) plus room for the run reports the pack's web extension shows on its
nodes, so nothing overlaps before or after a run. ``extra.ds`` opens the view with the
whole graph (its Nodes 2.0 size in 1.32.9 included) inside a 1400x800 window's free canvas.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "example_workflows"
sys.path.insert(0, str(REPO))

from cmlora_core.cmlora import FULL, Planner, Schedule, ScheduleSettings  # noqa: E402  (pure Python, no torch)

# ----------------------------------------------------------------------------- node types


@dataclass(frozen=True)
class Widget:
    """A widget input: its name, socket type, default (None: must be given) and whether the
    frontend follows it with a 'control after generate' value (KSampler's seed)."""

    name: str
    type: str
    default: object = None
    control: bool = False


@dataclass(frozen=True)
class Socket:
    """A linkable input."""

    name: str
    type: str


def W(name, type_, default=None, control=False):
    return Widget(name, type_, default, control)


# Inputs in the order of the node's /object_info input_order (required, then optional), as the
# frontend lays out sockets and widgets; the frontend saves widget values in this order, a
# control value right after each seed. tests/e2e/test_examples.py checks this against the server.
NODE_TYPES: dict[str, tuple[list, list]] = {
    "CheckpointLoaderSimple": ([W("ckpt_name", "COMBO")], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "CMLoRA_LoraStack": ([
        W("lora_name", "COMBO"), W("strength_model", "FLOAT", 1.0), W("strength_clip", "FLOAT", 1.0),
        W("enabled", "BOOLEAN", True), W("category", "COMBO", "auto"), W("concept", "STRING", ""),
        W("trigger", "STRING", ""), Socket("stack", "CMLORA_STACK"), W("start_at", "FLOAT", 0.0),
        W("end_at", "FLOAT", 1.0), W("strength_curve", "COMBO", "constant"), W("strength_model_end", "FLOAT", 0.0),
        Socket("mask", "MASK"), W("mask_feather", "INT", 16),
    ], [("stack", "CMLORA_STACK")]),
    "CMLoRA_ApplyClip": ([Socket("clip", "CLIP"), Socket("stack", "CMLORA_STACK")], [("clip", "CLIP")]),
    "CMLoRA_Apply": ([
        Socket("model", "MODEL"), Socket("stack", "CMLORA_STACK"), W("method", "COMBO", "composite"),
        W("switch_interval", "INT", 5), Socket("schedule", "CMLORA_SCHEDULE"),
    ], [("model", "MODEL")]),
    "CMLoRA_Sampler": ([
        Socket("model", "MODEL"), Socket("stack", "CMLORA_STACK"), W("method", "COMBO", "composite"),
        W("switch_interval", "INT", 5), W("seed", "INT", 0, control=True), W("steps", "INT", 20),
        W("cfg", "FLOAT", 7.0), W("sampler_name", "COMBO", "euler"), W("scheduler", "COMBO", "normal"),
        Socket("positive", "CONDITIONING"), Socket("negative", "CONDITIONING"), Socket("latent_image", "LATENT"),
        W("denoise", "FLOAT", 1.0), Socket("schedule", "CMLORA_SCHEDULE"),
    ], [("LATENT", "LATENT"), ("report", "STRING")]),
    "CMLoRA_Profiler": ([
        Socket("model", "MODEL"), Socket("stack", "CMLORA_STACK"), Socket("positive", "CONDITIONING"),
        Socket("negative", "CONDITIONING"), Socket("latent_image", "LATENT"), W("seed", "INT", 0),
        W("steps", "INT", 20), W("cfg", "FLOAT", 7.0), W("sampler_name", "COMBO", "euler"),
        W("scheduler", "COMBO", "normal"), Socket("vae", "VAE"),
    ], [("profile", "CMLORA_PROFILE"), ("plot", "IMAGE")]),
    "CMLoRA_FrequencyScheduler": ([
        W("mode", "COMBO", "offline"), W("switch_interval", "INT", 5), W("cache", "COMBO", "deep"),
        W("refresh", "COMBO", "nonuniform"), W("refresh_interval", "INT", 2), W("h_to_l_fraction", "FLOAT", 0.55),
        W("online_threshold", "FLOAT", 0.5), W("w_dom", "COMBO", "constant"), W("dominant_full", "BOOLEAN", True),
        W("preview_steps", "INT", 20), Socket("profile", "CMLORA_PROFILE"), Socket("stack", "CMLORA_STACK"),
    ], [("schedule", "CMLORA_SCHEDULE"), ("timeline", "IMAGE")]),
    "CLoRA_AttentionMasker": ([
        Socket("model", "MODEL"), Socket("clip", "CLIP"), Socket("stack", "CMLORA_STACK"), W("prompt", "STRING", ""),
        W("temperature", "FLOAT", 0.5), W("step_size", "FLOAT", 20.0), W("stop_fraction", "FLOAT", 0.5),
        W("extra_iterations", "INT", 20), W("mask_threshold", "FLOAT", 0.4), W("attention", "COMBO", "conditional"),
        W("style_scope", "COMBO", "global"), W("mask_morphology", "COMBO", "none"), W("style_subjects", "STRING", ""),
        Socket("masks", "MASK"), W("mask_mode", "COMBO", "replace"),
    ], [("model", "MODEL"), ("positive", "CONDITIONING")]),
    "CMLoRA_CompareMethods": ([
        Socket("model", "MODEL"), Socket("stack", "CMLORA_STACK"), Socket("positive", "CONDITIONING"),
        Socket("negative", "CONDITIONING"), Socket("latent_image", "LATENT"), Socket("vae", "VAE"),
        W("seed", "INT", 0, control=True), W("steps", "INT", 20), W("cfg", "FLOAT", 7.0),
        W("sampler_name", "COMBO", "euler"), W("scheduler", "COMBO", "normal"),
        W("methods", "STRING", "merge, switch, composite, cmlora"), W("switch_interval", "INT", 5),
        Socket("schedule", "CMLORA_SCHEDULE"),
    ], [("grid", "IMAGE"), ("report", "STRING")]),
    "CLoRA_Masks": ([Socket("model", "MODEL"), Socket("samples", "LATENT"), W("step", "INT", -1),
                     Socket("image", "IMAGE")], [("masks", "MASK"), ("overlay", "IMAGE")]),
    "CLIPTextEncode": ([W("text", "STRING"), Socket("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ([W("width", "INT", 512), W("height", "INT", 512), W("batch_size", "INT", 1)],
                         [("LATENT", "LATENT")]),
    "KSampler": ([
        Socket("model", "MODEL"), W("seed", "INT", 0, control=True), W("steps", "INT", 20), W("cfg", "FLOAT", 8.0),
        W("sampler_name", "COMBO", "euler"), W("scheduler", "COMBO", "normal"), Socket("positive", "CONDITIONING"),
        Socket("negative", "CONDITIONING"), Socket("latent_image", "LATENT"), W("denoise", "FLOAT", 1.0),
    ], [("LATENT", "LATENT")]),
    "VAEDecode": ([Socket("samples", "LATENT"), Socket("vae", "VAE")], [("IMAGE", "IMAGE")]),
    "SaveImage": ([Socket("images", "IMAGE"), W("filename_prefix", "STRING", "ComfyUI")], []),
    "PreviewImage": ([Socket("images", "IMAGE")], []),
    "MaskPreview": ([Socket("mask", "MASK")], []),
    # frontend-only (no server node): a text box rendered as Markdown
    "MarkdownNote": ([W("text", "STRING", "")], []),
}

# (width, height) stored in the file: the classic node's body (the title bar of 30 sits above pos)
SIZES = {
    "CheckpointLoaderSimple": (320, 100), "CMLoRA_LoraStack": (330, 330), "CMLoRA_ApplyClip": (260, 50),
    "CMLoRA_Apply": (320, 120), "CMLoRA_Sampler": (330, 420), "CMLoRA_Profiler": (330, 260),
    "CMLoRA_FrequencyScheduler": (330, 300), "CLoRA_AttentionMasker": (350, 400), "CLoRA_Masks": (270, 100),
    "CMLoRA_CompareMethods": (340, 440),
    "CLIPTextEncode": (320, 120), "EmptyLatentImage": (320, 110), "KSampler": (320, 270), "VAEDecode": (230, 50),
    "SaveImage": (260, 270), "PreviewImage": (260, 260), "MaskPreview": (260, 260), "MarkdownNote": (420, 300),
}
# Height each node may take on screen, title included, in classic graph units: the tallest of the
# four renderings measured (1.32.9 and 1.49.6, classic and Nodes 2.0 with 1.32.9's 1.2 layout
# scale divided out) with this pack's web extension, plus what a run adds: report boxes, and
# images, which Nodes 2.0 shows at the node's full width (a square image: width + header).
BUDGET = {
    "CheckpointLoaderSimple": 150, "CMLoRA_LoraStack": 500, "CMLoRA_ApplyClip": 120, "CMLoRA_Apply": 200,
    "CMLoRA_Sampler": 560, "CMLoRA_Profiler": 350, "CMLoRA_FrequencyScheduler": 390, "CLoRA_AttentionMasker": 480,
    "CLoRA_Masks": 260, "CMLoRA_CompareMethods": 640, "CLIPTextEncode": 170, "EmptyLatentImage": 170, "KSampler": 320, "VAEDecode": 100,
    "SaveImage": 350, "PreviewImage": 340, "MaskPreview": 340,
}
GAP_X, GAP_Y = 70, 40
TITLE = 30  # classic title bar height, drawn above a node's pos

# The window the opening view is made for: the canvas left free by the frontend's side bar,
# tab bar, floating run toolbar and zoom controls in a 1400x800 window.
VIEW_BOX = (70, 140, 1380, 730)
NODES2_SCALE = 1.2  # 1.32.9 spreads a classic layout by this when it opens it in Nodes 2.0

CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")


class Graph:
    """A UI-format workflow built node by node; nodes go into columns laid out by ``to_json``."""

    def __init__(self):
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.columns: dict[int, list[tuple[dict, int]]] = {}

    def add(self, type_: str, column: int, title: str | None = None, node_size=None, budget=None,
            properties=None, **values) -> dict:
        """A node of ``type_`` in ``column`` (below the ones already there), its widgets set from
        ``values`` by name (the rest keep their defaults; ``seed_control`` sets the value after a seed).
        ``node_size`` and ``budget`` override the stored size and the height kept for the node."""
        inputs, outputs = NODE_TYPES[type_]
        widgets, sockets = [], []
        for spec in inputs:
            if isinstance(spec, Socket):
                sockets.append({"name": spec.name, "type": spec.type, "link": None})
                continue
            if spec.name not in values and spec.default is None:
                raise ValueError(f"{type_}: widget {spec.name!r} has no default; give a value")
            widgets.append(values.pop(spec.name, spec.default))
            if spec.control:
                control = values.pop(f"{spec.name}_control", "fixed")
                if control not in CONTROL_VALUES:
                    raise ValueError(f"{type_}: {spec.name}_control {control!r} is not one of {CONTROL_VALUES}")
                widgets.append(control)
        if values:
            raise ValueError(f"{type_} has no widget {', '.join(values)}")
        # the frontend saves every socket (linked or not) first, then one entry per widget
        sockets += [{"name": s.name, "type": s.type, "widget": {"name": s.name}, "link": None}
                    for s in inputs if isinstance(s, Widget)] if type_ != "MarkdownNote" else []
        size = list(node_size or SIZES[type_])
        node = {"id": len(self.nodes) + 1, "type": type_, "pos": [0, 0], "size": size, "flags": {},
                "order": len(self.nodes), "mode": 0, "inputs": sockets,
                "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs)],
                "properties": {"Node name for S&R": type_, **(properties or {})}, "widgets_values": widgets}
        if title:
            node["title"] = title
        if type_ == "MarkdownNote":
            node["properties"] = {}
            node["color"], node["bgcolor"] = "#432", "#653"
        self.nodes.append(node)
        self.columns.setdefault(column, []).append((node, budget or BUDGET.get(type_, size[1] + TITLE + 20)))
        return node

    def link(self, src: dict, output: str, dst: dict, input_: str):
        outs = [o["name"] for o in src["outputs"]]
        slot = outs.index(output)
        target = next(i for i, s in enumerate(dst["inputs"]) if s["name"] == input_ and "widget" not in s)
        type_ = src["outputs"][slot]["type"]
        if dst["inputs"][target]["type"] != type_:
            raise ValueError(f"{src['type']}.{output} ({type_}) cannot feed {dst['type']}.{input_}")
        lid = len(self.links) + 1
        self.links.append([lid, src["id"], slot, dst["id"], target, type_])
        src["outputs"][slot]["links"].append(lid)
        dst["inputs"][target]["link"] = lid

    def layout(self) -> tuple[float, float, float, float]:
        """Place the columns left to right, nodes top to bottom; the graph's bounds (title bars included)."""
        x = right = bottom = 0
        for col in sorted(self.columns):
            entries = self.columns[col]
            width = max(node["size"][0] for node, _ in entries)
            y = TITLE
            for node, height in entries:
                node["pos"] = [x, y]
                y += height + GAP_Y
                bottom = max(bottom, y - GAP_Y)
            right = x + width
            x += width + GAP_X
        return 0, 0, right, bottom

    def to_json(self, title: str, description: str) -> dict:
        x0, y0, x1, y1 = self.layout()
        # fit the Nodes 2.0 extent of 1.32.9 (1.2 x the classic one, grown from the top left corner)
        bx0, by0, bx1, by1 = VIEW_BOX
        scale = min((bx1 - bx0) / ((x1 - x0) * NODES2_SCALE), (by1 - by0) / ((y1 - y0) * NODES2_SCALE), 1.0)
        scale = round(scale, 3)
        offset = [round(bx0 / scale - x0, 1), round(by0 / scale - y0, 1)]
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {},
                "extra": {"ds": {"scale": scale, "offset": offset},
                          "info": {"title": title, "description": description}},
                "version": 0.4}


def model_downloads(workflow: dict) -> list[str]:
    """The model files a workflow lists for download (``properties.models`` on its nodes): the
    real-use examples. The demo examples list none; those are the ones the demo and tests run."""
    return [m["name"] for n in workflow.get("nodes", []) for m in (n.get("properties") or {}).get("models") or []]


# ----------------------------------------------------------------------------- the examples

DEMO_CKPT = "cmlora_tiny_sd15.safetensors"
SD15 = {"name": "v1-5-pruned-emaonly-fp16.safetensors", "directory": "checkpoints",
        "url": "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
               "v1-5-pruned-emaonly-fp16.safetensors?download=true"}
SDXL = {"name": "sd_xl_base_1.0.safetensors", "directory": "checkpoints",
        "url": "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/"
               "sd_xl_base_1.0.safetensors?download=true"}


@dataclass(frozen=True)
class Lora:
    file: str
    category: str
    concept: str
    strength: float = 0.8
    trigger: str = ""


DEMO_LORAS = [Lora("cmlora_demo_character.safetensors", "character", "cat"),
              Lora("cmlora_demo_style.safetensors", "style", "watercolor"),
              Lora("cmlora_demo_background.safetensors", "background", "mountains")]
# CMLoRA's profiler measures the first two (category auto); the background one is set by hand
PROFILED_LORAS = [Lora(lora.file, "auto" if lora.category != "background" else "background", lora.concept)
                  for lora in DEMO_LORAS]
CLORA_LORAS = [Lora("cmlora_demo_character.safetensors", "character", "cat", 1.0),
               Lora("cmlora_demo_background.safetensors", "background", "mountains", 1.0),
               Lora("cmlora_demo_style.safetensors", "style", "", 0.8)]
PROMPT = "a cat in front of mountains, watercolor"
NEGATIVE = "blurry, lowres"


def loader_and_stacks(g: Graph, ckpt: str, loras: list[Lora], model_info: dict | None = None, first_column=0):
    """Load Checkpoint above the first LoRA Stack node, the other stack nodes in the next column;
    returns (loader, last stack node)."""
    props = {"models": [model_info]} if model_info else None
    loader = g.add("CheckpointLoaderSimple", first_column, ckpt_name=ckpt, properties=props)
    prev = None
    for i, lora in enumerate(loras):
        label = f"LoRA {i + 1}: {lora.category}" + (f" ({lora.concept})" if lora.concept else "")
        column = first_column if i == 0 else first_column + 1
        node = g.add("CMLoRA_LoraStack", column, title=label, lora_name=lora.file, strength_model=lora.strength,
                     strength_clip=lora.strength, category=lora.category, concept=lora.concept, trigger=lora.trigger)
        if prev is not None:
            g.link(prev, "stack", node, "stack")
        prev = node
    return loader, prev


def encoders(g: Graph, column: int, loader: dict, stack: dict, prompt: str, negative: str, size: int):
    """CMLoRA Apply CLIP, the two prompts and the empty latent, in one column."""
    clip = g.add("CMLoRA_ApplyClip", column)
    g.link(loader, "CLIP", clip, "clip")
    g.link(stack, "stack", clip, "stack")
    pos = g.add("CLIPTextEncode", column, title="Positive prompt", text=prompt)
    neg = g.add("CLIPTextEncode", column, title="Negative prompt", text=negative)
    for enc in (pos, neg):
        g.link(clip, "clip", enc, "clip")
    latent = g.add("EmptyLatentImage", column, width=size, height=size, batch_size=1)
    return pos, neg, latent


def decode_and_save(g: Graph, column: int, loader: dict, sampler: dict, prefix: str):
    decode = g.add("VAEDecode", column)
    g.link(sampler, "LATENT", decode, "samples")
    g.link(loader, "VAE", decode, "vae")
    save = g.add("SaveImage", column, filename_prefix=prefix)
    g.link(decode, "IMAGE", save, "images")
    return decode, save


def profiler_and_scheduler(g: Graph, column: int, loader, stack, pos, neg, latent, mode: str, steps: int,
                           seed: int, cfg: float, threshold: float, switch_interval: int = 2):
    profiler = g.add("CMLoRA_Profiler", column, seed=seed, steps=steps, cfg=cfg)
    for src, out, name in ((loader, "MODEL", "model"), (stack, "stack", "stack"), (pos, "CONDITIONING", "positive"),
                           (neg, "CONDITIONING", "negative"), (latent, "LATENT", "latent_image"),
                           (loader, "VAE", "vae")):
        g.link(src, out, profiler, name)
    scheduler = g.add("CMLoRA_FrequencyScheduler", column, mode=mode, switch_interval=switch_interval,
                      online_threshold=threshold, preview_steps=steps)
    g.link(profiler, "profile", scheduler, "profile")
    return profiler, scheduler


def composition(method: str, interval: int = 2, steps: int = 6, loras=DEMO_LORAS, mode: str | None = None) -> Graph:
    """The demo checkpoint, three LoRA Stack nodes and CMLoRA Sampler; with ``mode`` also the
    Profiler and the Frequency Scheduler (method cmlora) and previews of their pictures."""
    g = Graph()
    loader, stack = loader_and_stacks(g, DEMO_CKPT, loras)
    pos, neg, latent = encoders(g, 2, loader, stack, PROMPT, NEGATIVE, 64)
    if mode:
        threshold = 0.96 if mode == "online" else 0.5
        profiler, scheduler = profiler_and_scheduler(g, 3, loader, stack, pos, neg, latent, mode, steps, 42, 6.0,
                                                     threshold)
    sampler = g.add("CMLoRA_Sampler", 4 if mode else 3, method=method, switch_interval=interval, seed=42,
                    steps=steps, cfg=6.0)
    for src, out, name in ((loader, "MODEL", "model"), (stack, "stack", "stack"), (pos, "CONDITIONING", "positive"),
                           (neg, "CONDITIONING", "negative"), (latent, "LATENT", "latent_image")):
        g.link(src, out, sampler, name)
    if mode:
        g.link(scheduler, "schedule", sampler, "schedule")
        timeline = g.add("PreviewImage", 4, title="Schedule: dominant LoRA per step")
        g.link(scheduler, "timeline", timeline, "images")
    decode_and_save(g, 5 if mode else 4, loader, sampler, f"cmlora_{mode or method}")
    if mode:
        plot = g.add("PreviewImage", 5, title="Profile: each LoRA's spectrum")
        g.link(profiler, "plot", plot, "images")
    return g


def apply_with_ksampler(steps: int = 6) -> Graph:
    """CMLoRA Apply (composite) patches the model; the stock KSampler samples it."""
    g = Graph()
    loader, stack = loader_and_stacks(g, DEMO_CKPT, DEMO_LORAS)
    pos, neg, latent = encoders(g, 2, loader, stack, PROMPT, NEGATIVE, 64)
    apply = g.add("CMLoRA_Apply", 3, method="composite", switch_interval=2)
    g.link(loader, "MODEL", apply, "model")
    g.link(stack, "stack", apply, "stack")
    sampler = g.add("KSampler", 3, seed=42, steps=steps, cfg=6.0)
    g.link(apply, "model", sampler, "model")
    for src, name in ((pos, "positive"), (neg, "negative"), (latent, "latent_image")):
        g.link(src, src["outputs"][0]["name"], sampler, name)
    decode_and_save(g, 4, loader, sampler, "cmlora_apply_ksampler")
    return g


def compare_methods(steps: int = 6) -> Graph:
    """CMLoRA Compare Methods: the same seed through merge, switch, composite and cmlora (its
    schedule from the stack's categories, no profiling), one labelled grid saved."""
    g = Graph()
    loader, stack = loader_and_stacks(g, DEMO_CKPT, DEMO_LORAS)
    pos, neg, latent = encoders(g, 2, loader, stack, PROMPT, NEGATIVE, 64)
    scheduler = g.add("CMLoRA_FrequencyScheduler", 3, mode="offline", switch_interval=2, preview_steps=steps)
    g.link(stack, "stack", scheduler, "stack")
    compare = g.add("CMLoRA_CompareMethods", 4, seed=42, steps=steps, cfg=6.0, switch_interval=2)
    for src, out, name in ((loader, "MODEL", "model"), (stack, "stack", "stack"), (pos, "CONDITIONING", "positive"),
                           (neg, "CONDITIONING", "negative"), (latent, "LATENT", "latent_image"),
                           (loader, "VAE", "vae"), (scheduler, "schedule", "schedule")):
        g.link(src, out, compare, name)
    save = g.add("SaveImage", 5, title="Save the grid", node_size=(420, 300), filename_prefix="cmlora_compare")
    g.link(compare, "grid", save, "images")
    return g


def clora_graph(ckpt: str, loras: list[Lora], prompt: str, size: int, steps: int, cfg: float, seed_control: str,
                model_info: dict | None = None, notes: list[tuple[str, int]] = (), extra_iterations: int = 3,
                prefix: str = "clora") -> Graph:
    """Subject LoRAs and a style LoRA through the CLoRA Attention Masker and a stock KSampler; the
    masks it used come out of CLoRA Masks as an overlay on the image and as masks."""
    g = Graph()
    first = 1 if notes else 0
    for text, height in notes:
        g.add("MarkdownNote", 0, title="Read me", node_size=(420, height), budget=height + TITLE + 20, text=text)
    loader, stack = loader_and_stacks(g, ckpt, loras, model_info, first)
    masker = g.add("CLoRA_AttentionMasker", first + 2, prompt=prompt, extra_iterations=extra_iterations)
    g.link(loader, "MODEL", masker, "model")
    g.link(loader, "CLIP", masker, "clip")
    g.link(stack, "stack", masker, "stack")
    neg = g.add("CLIPTextEncode", first + 2, title="Negative prompt", text=NEGATIVE)
    g.link(loader, "CLIP", neg, "clip")
    latent = g.add("EmptyLatentImage", first + 2, width=size, height=size, batch_size=1)
    sampler = g.add("KSampler", first + 3, seed=42, seed_control=seed_control, steps=steps, cfg=cfg)
    g.link(masker, "model", sampler, "model")
    g.link(masker, "positive", sampler, "positive")
    g.link(neg, "CONDITIONING", sampler, "negative")
    g.link(latent, "LATENT", sampler, "latent_image")
    decode = g.add("VAEDecode", first + 3)
    g.link(sampler, "LATENT", decode, "samples")
    g.link(loader, "VAE", decode, "vae")
    masks = g.add("CLoRA_Masks", first + 3, step=-1)
    g.link(masker, "model", masks, "model")
    g.link(sampler, "LATENT", masks, "samples")
    g.link(decode, "IMAGE", masks, "image")
    save = g.add("SaveImage", first + 4, filename_prefix=prefix)
    g.link(decode, "IMAGE", save, "images")
    overlay = g.add("PreviewImage", first + 4, title="Where each LoRA acted (overlay)")
    g.link(masks, "overlay", overlay, "images")
    mask_view = g.add("MaskPreview", first + 4, title="The masks, one per subject LoRA")
    g.link(masks, "masks", mask_view, "mask")
    return g


# --- real use: the usual base checkpoints, placeholders for the artist's LoRAs

SD15_LORAS = [Lora("YOUR_character_lora.safetensors", "auto", "girl", 0.8),
              Lora("YOUR_style_lora.safetensors", "auto", "watercolor", 0.7),
              Lora("YOUR_background_lora.safetensors", "background", "city street", 0.7)]
SD15_PROMPT = "a girl standing in a city street, watercolor"
SDXL_LORAS = [Lora("YOUR_first_subject_lora.safetensors", "character", "cat", 1.0),
              Lora("YOUR_second_subject_lora.safetensors", "character", "dog", 1.0),
              Lora("YOUR_style_lora.safetensors", "style", "", 0.6)]
SDXL_PROMPT = "a photo of a cat and a dog sitting in a garden"

README_SD15 = """## CMLoRA with your own LoRAs (SD1.5)

**1. Checkpoint.** `v1-5-pruned-emaonly-fp16.safetensors` in `models/checkpoints` (the frontend offers the download when it is missing). Any SD1.5 checkpoint works.

**2. LoRAs.** In each *LoRA* node pick one of your SD1.5 LoRA files in place of the `YOUR_...` placeholder (they go in `models/loras`):
- `concept`: the words of the prompt this LoRA depicts (here *girl*, *watercolor*, *city street*);
- `category`: `auto` lets the Profiler measure it; `background` (low detail) or `character`/`style` fix it;
- `trigger` (advanced): empty takes the trigger words from the file; type them if it has none.

**3. Prompt.** Name every concept, e.g. *a girl standing in a city street, watercolor*, with each LoRA's trigger words.

**4. Run.** The Profiler samples each LoRA once (cached for the same inputs), the Scheduler plans which LoRA leads at each step, the CMLoRA Sampler composes them. Keep 512x512 for SD1.5.
"""

README_SDXL = """## CLoRA: two subjects with your own LoRAs (SDXL)

**1. Checkpoint.** `sd_xl_base_1.0.safetensors` in `models/checkpoints` (the frontend offers the download when it is missing).

**2. LoRAs.** In each *LoRA* node pick one of your SDXL LoRA files in place of the `YOUR_...` placeholder (`models/loras`):
- two **subject** LoRAs (category `character`, `object`, ...) whose `concept` words appear in the prompt (here *cat* and *dog*); CLoRA keeps each LoRA inside the region its concept attends to;
- one **style** LoRA (category `style`, no concept) applies everywhere; set it off (`enabled`) if you have none;
- `trigger` (advanced): empty takes the trigger words from the file.

**3. Prompt.** Type it in the Attention Masker's `prompt`, naming both concepts: *a photo of a cat and a dog sitting in a garden*.

**4. Run.** Sample with `euler` or `ddim` at 1024x1024. *CLoRA Masks* shows where each LoRA acted.
"""


def sd15_cmlora() -> Graph:
    """SD1.5 base, three of the artist's LoRAs: Profiler -> Frequency Scheduler -> CMLoRA Sampler."""
    g = Graph()
    g.add("MarkdownNote", 0, title="Read me", node_size=(440, 340), budget=400, text=README_SD15)
    loader, stack = loader_and_stacks(g, SD15["name"], SD15_LORAS, SD15, first_column=1)
    pos, neg, latent = encoders(g, 3, loader, stack, SD15_PROMPT, "blurry, lowres, bad anatomy", 512)
    profiler, scheduler = profiler_and_scheduler(g, 4, loader, stack, pos, neg, latent, "offline", 20, 1, 7.0, 0.5,
                                                 switch_interval=5)
    sampler = g.add("CMLoRA_Sampler", 5, method="cmlora", switch_interval=5, seed=1, seed_control="randomize",
                    steps=20, cfg=7.0)
    for src, out, name in ((loader, "MODEL", "model"), (stack, "stack", "stack"), (pos, "CONDITIONING", "positive"),
                           (neg, "CONDITIONING", "negative"), (latent, "LATENT", "latent_image"),
                           (scheduler, "schedule", "schedule")):
        g.link(src, out, sampler, name)
    decode_and_save(g, 6, loader, sampler, "cmlora_sd15")
    timeline = g.add("PreviewImage", 6, title="Schedule: dominant LoRA per step")
    g.link(scheduler, "timeline", timeline, "images")
    return g


def sdxl_clora() -> Graph:
    return clora_graph(SDXL["name"], SDXL_LORAS, SDXL_PROMPT, 1024, 30, 6.0, "randomize", SDXL,
                       notes=[(README_SDXL, 360)], extra_iterations=20, prefix="clora_sdxl")


# ----------------------------------------------------------------------------- thumbnails

THUMB = 400
BG, INK, MUTED, GRID = (27, 30, 38), (236, 238, 242), (150, 156, 170), (58, 62, 74)
REAL_USE = (128, 74, 22)
ROLE_COLOURS = [(230, 85, 60), (60, 130, 220), (90, 180, 90)]  # the pack's PALETTE (nodes/plots.py)


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _canvas(title: str, subtitle: str, badge: str):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (THUMB, THUMB), BG)
    d = ImageDraw.Draw(img)
    demo = badge.startswith("demo")
    if not demo:  # the real-use examples: a warm header, so they stand out from the demo ones
        d.rectangle((0, 0, THUMB, 92), fill=REAL_USE)
    d.text((20, 16), title, fill=INK, font=_font(34))
    d.text((20, 60), subtitle, fill=INK if not demo else MUTED, font=_font(19))
    badge_font = _font(17)
    w = d.textlength(badge, font=badge_font)
    d.rounded_rectangle((20, THUMB - 44, 20 + w + 20, THUMB - 14), radius=8,
                        fill=(52, 56, 68) if demo else REAL_USE)
    d.text((30, THUMB - 40), badge, fill=INK, font=badge_font)
    return img, d


def _hatch(d, box, colour):
    """A cell drawn as a shallow pass: the colour dimmed, with diagonal lines."""
    x0, y0, x1, y1 = box
    dim = tuple(int(c * 0.35 + b * 0.65) for c, b in zip(colour, BG))
    d.rectangle(box, fill=dim)
    for k in range(-int(y1 - y0), int(x1 - x0), 6):
        d.line([(x0 + max(k, 0), y0 + max(-k, 0)), (x0 + min(k + (y1 - y0), x1 - x0), y0 + min(x1 - x0 - k, y1 - y0))],
               fill=colour, width=1)


def _timeline(d, rows: list[str], cells: Callable[[int, int], str], steps: int, top: int = 110,
              colours=ROLE_COLOURS, marks: dict[int, str] | None = None, row_h: int = 44):
    """A steps x LoRAs grid: cells(row, step) -> 'full' | 'shallow' | 'off' | 'dominant'."""
    left, right = GRID_LEFT, THUMB - 20
    cw = (right - left) / steps
    label = _font(17)
    for r, name in enumerate(rows):
        y0 = top + r * (row_h + 10)
        d.text((20, y0 + row_h / 2 - 11), name, fill=colours[r % len(colours)], font=label)
        for s in range(steps):
            box = (left + s * cw + 2, y0, left + (s + 1) * cw - 2, y0 + row_h)
            kind = cells(r, s)
            colour = colours[r % len(colours)]
            if kind in ("full", "dominant"):
                d.rectangle(box, fill=colour)
                if kind == "dominant":
                    d.rectangle(box, outline=INK, width=3)
            elif kind == "shallow":
                _hatch(d, box, colour)
            else:
                d.rectangle(box, outline=GRID, width=1)
    bottom = top + len(rows) * (row_h + 10)
    small = _font(15)
    d.text((left, bottom), "step 1", fill=MUTED, font=small)
    d.text((right - d.textlength(f"{steps}", font=small), bottom), f"{steps}", fill=MUTED, font=small)
    for step, text in (marks or {}).items():
        x = left + step * cw
        for y in range(top - 8, bottom - 6, 8):
            d.line([(x, y), (x, y + 4)], fill=INK, width=2)
        d.text((x + 4, top - 26), text, fill=INK, font=small)
    return bottom


def _legend(d, y: int, items: list[tuple[str, str]]):
    x = 20
    f = _font(15)
    for kind, text in items:
        box = (x, y + 2, x + 16, y + 18)
        if kind == "shallow":
            _hatch(d, box, INK)
        elif kind == "dominant":
            d.rectangle(box, fill=(120, 120, 130), outline=INK, width=3)
        else:
            d.rectangle(box, fill=INK)
        d.text((x + 22, y), text, fill=MUTED, font=f)
        x += 22 + d.textlength(text, font=f) + 18


NAMES = ["character", "style", "background"]
GRID_LEFT = 124


def thumb_merge(badge="demo models"):
    img, d = _canvas("Merge", "all LoRAs folded into the weights", badge)
    bottom = _timeline(d, ["weights"], lambda r, s: "full", 12, top=120, row_h=120, colours=[INK])
    # the merged band: three stripes in every cell
    left, right = GRID_LEFT, THUMB - 20
    cw = (right - left) / 12
    for s in range(12):
        for k, colour in enumerate(ROLE_COLOURS):
            d.rectangle((left + s * cw + 2, 120 + k * 40, left + (s + 1) * cw - 2, 120 + (k + 1) * 40), fill=colour)
    d.text((20, bottom + 30), "W + dW1 + dW2 + dW3, every step", fill=INK, font=_font(19))
    return img


def thumb_switch(interval=2, badge="demo models"):
    img, d = _canvas("LoRA Switch", f"one LoRA per step, turns of {interval}", badge)
    bottom = _timeline(d, NAMES, lambda r, s: "full" if (s // interval) % 3 == r else "off", 12)
    d.text((20, bottom + 30), "1 UNet pass per step, like merge", fill=INK, font=_font(19))
    return img


def thumb_composite(title="LoRA Composite", subtitle="every LoRA predicts, averaged", badge="demo models"):
    img, d = _canvas(title, subtitle, badge)
    bottom = _timeline(d, NAMES + ["average"], lambda r, s: "full", 12, colours=ROLE_COLOURS + [(200, 200, 200)],
                       row_h=34)
    d.text((20, bottom + 24), "3 LoRA copies in one forward", fill=INK, font=_font(19))
    return img


DROP_AT = 5


def cmlora_plan(mode: str, steps: int = 12, interval: int = 2, drop_at: int = DROP_AT):
    """The pack's own planner on a 3-LoRA stack (character and style high-frequency, background
    low); online changes phase where the run would measure the image's detail settle (``drop_at``)."""
    settings = ScheduleSettings(mode=mode, switch_interval=interval)
    planner = Planner(Schedule(settings, high=(0, 1), low=(2,), names=tuple(NAMES)), steps)
    plans = []
    for step in range(steps):
        plans.append(planner.plan(step))
        if mode == "online":
            planner.observe(step, 0.9 if step < drop_at else 0.2)
    return plans


CMLORA_TEXT = {
    "offline": ("CMLoRA offline", "profiled order, fixed phase change"),
    "online": ("CMLoRA online", "phase change measured in the run"),
    "async": ("CMLoRA async", "lead and cache refresh apart"),
}


def thumb_cmlora(mode: str, badge="demo models", title=None, subtitle=None):
    t, sub = CMLORA_TEXT[mode]
    img, d = _canvas(title or t, subtitle or sub, badge)
    plans = cmlora_plan(mode)
    steps = len(plans)
    left, right = GRID_LEFT, THUMB - 20
    cw = (right - left) / steps
    small = _font(15)
    change = next((p.step for p in plans if p.phase == "L"), None)
    if mode == "online":  # the detail the run measures after each step, falling under the threshold
        top, bottom = 98, 148
        d.text((20, top + 6), "image detail", fill=MUTED, font=small)
        d.text((20, top + 24), "vs threshold", fill=MUTED, font=small)
        for x in range(int(left), int(right), 10):
            d.line([(x, top + 30), (x + 5, top + 30)], fill=MUTED, width=1)
        # under the threshold from step DROP_AT on, as cmlora_plan tells the planner
        pts = [(left + (s + 0.5) * cw, top + 30 + 3.5 * (s - DROP_AT + 0.5)) for s in range(steps)]
        d.line(pts, fill=INK, width=3)
    elif mode == "offline":
        d.text((20, 104), "from the profile:", fill=MUTED, font=small)
        d.text((20, 124), "H = character, style   L = background", fill=MUTED, font=small)
    else:
        d.text((20, 104), "lead changes every 2 steps;", fill=MUTED, font=small)
        d.text((20, 124), "each refresh renews the next LoRA", fill=MUTED, font=small)

    def cell(r, s):
        p = plans[s]
        if p.dominant == r:
            return "dominant"
        return "full" if p.passes[r] == FULL else "shallow"

    marks = {change: "H -> L"} if mode != "async" and change is not None else {}
    bottom = _timeline(d, NAMES, cell, steps, top=170, marks=marks, row_h=32)
    _legend(d, bottom + 20, [("dominant", "leads"), ("full", "full pass"), ("shallow", "shallow")])
    return img


def thumb_clora(badge="demo models", subjects=("cat", "mountains"), title="CLoRA"):
    img, d = _canvas(title, "subjects kept to their own regions", badge)
    box = (20, 100, 250, 330)
    x0, y0, x1, y1 = box
    mid = (x0 + x1) // 2
    d.rectangle((x0, y0, mid, y1), fill=ROLE_COLOURS[0])
    d.rectangle((mid, y0, x1, y1), fill=ROLE_COLOURS[2])
    for k in range(x0 - (y1 - y0), x1, 14):  # the style LoRA, everywhere
        d.line([(max(k, x0), y0 + max(x0 - k, 0)), (min(k + (y1 - y0), x1), y0 + min(x1 - k, y1 - y0))],
                     fill=ROLE_COLOURS[1], width=3)
    d.rectangle(box, outline=INK, width=2)
    f = _font(19)
    for x, text in ((x0 + 10, subjects[0]), (mid + 10, subjects[1])):
        w = d.textlength(text, font=f)
        d.rectangle((x - 4, y0 + 8, x + w + 4, y0 + 32), fill=BG)
        d.text((x, y0 + 10), text, fill=INK, font=f)
    small = _font(16)
    lines = [("subject LoRA 1", ROLE_COLOURS[0]), ("subject LoRA 2", ROLE_COLOURS[2]), ("style LoRA:", ROLE_COLOURS[1]),
             ("  everywhere", ROLE_COLOURS[1]), ("masks from", MUTED), ("cross-attention", MUTED)]
    for i, (text, colour) in enumerate(lines):
        d.text((262, 108 + i * 34), text, fill=colour, font=small)
    return img


def thumb_apply(badge="demo models"):
    img, d = _canvas("CMLoRA Apply", "any sampler composes the stack", badge)
    f = _font(17)
    boxes = [("LoRA Stack x3", 110), ("CMLoRA Apply", 170), ("KSampler", 230)]
    for text, y in boxes:
        d.rounded_rectangle((60, y, 340, y + 40), radius=8, fill=(52, 56, 68), outline=MUTED)
        d.text((200 - d.textlength(text, font=f) / 2, y + 10), text, fill=INK, font=f)
    for y in (150, 210):
        d.line([(200, y), (200, y + 20)], fill=INK, width=3)
        d.polygon([(193, y + 12), (207, y + 12), (200, y + 20)], fill=INK)
    left, cw = 60, 280 / 12
    for r, colour in enumerate(ROLE_COLOURS):  # composite: all three every step
        for s in range(12):
            d.rectangle((left + s * cw + 1, 290 + r * 14, left + (s + 1) * cw - 1, 302 + r * 14), fill=colour)
    return img


def thumb_compare(badge="demo models"):
    img, d = _canvas("Compare methods", "one seed, one labelled grid", badge)
    f = _font(17)
    for i, (name, pattern) in enumerate((("merge", "merge"), ("switch", "switch"), ("composite", "all"),
                                         ("cmlora", "cmlora"))):
        x0 = 20 + (i % 2) * 185
        y0 = 100 + (i // 2) * 125
        d.rectangle((x0, y0, x0 + 175, y0 + 115), outline=MUTED, width=2)
        d.text((x0 + 8, y0 + 86), name, fill=INK, font=f)
        cw = 159 / 8
        for r, colour in enumerate(ROLE_COLOURS):
            for s in range(8):
                on = {"merge": True, "all": True, "switch": (s // 2) % 3 == r,
                      "cmlora": (s // 3) % 3 == r}[pattern]
                box = (x0 + 8 + s * cw + 1, y0 + 10 + r * 24, x0 + 8 + (s + 1) * cw - 1, y0 + 30 + r * 24)
                if on:
                    d.rectangle(box, fill=colour)
                elif pattern == "cmlora":
                    _hatch(d, box, colour)
                else:
                    d.rectangle(box, outline=GRID)
    return img


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Example:
    name: str  # the file name: the template browser's title
    description: str  # kept in extra.info for readers of the file
    build: Callable[[], Graph]
    thumbnail: Callable


def _cmlora_example(mode: str, gist: str):
    return Example(f"CMLoRA {mode} - {gist} (demo)",
                   f"CMLoRA ({mode}): the Profiler measures each LoRA, the Frequency Scheduler plans which one leads "
                   "each step, the CMLoRA Sampler runs the others as shallow passes around a cached deep feature.",
                   lambda: composition("cmlora", loras=PROFILED_LORAS, mode=mode), lambda: thumb_cmlora(mode))


EXAMPLES = [
    Example("Merge - all LoRAs in the weights (demo)",
            "Merge: the three LoRAs folded into the weights, as chained LoraLoaders do.",
            lambda: composition("merge"), thumb_merge),
    Example("LoRA Switch - one LoRA per step (demo)",
            "LoRA Switch: one LoRA active at a time, taking turns every 2 steps.",
            lambda: composition("switch"), thumb_switch),
    Example("LoRA Composite - predictions averaged (demo)",
            "LoRA Composite: every LoRA predicts the noise each step; the predictions are averaged.",
            lambda: composition("composite"), thumb_composite),
    _cmlora_example("offline", "profiled schedule"),
    _cmlora_example("online", "schedule follows the image"),
    _cmlora_example("async", "lead and refresh apart"),
    Example("CLoRA - two subjects kept apart, with masks (demo)",
            "CLoRA: a cat LoRA and a mountains LoRA kept to their own regions by the Attention Masker, a style "
            "LoRA everywhere; CLoRA Masks shows the masks it used.",
            lambda: clora_graph(DEMO_CKPT, CLORA_LORAS, PROMPT, 128, 6, 5.0, "fixed"), thumb_clora),
    Example("CMLoRA Apply + KSampler - any sampler (demo)",
            "CMLoRA Apply patches the model (composite here) and the stock KSampler samples it.",
            apply_with_ksampler, thumb_apply),
    Example("Compare methods - one seed, one grid (demo)",
            "CMLoRA Compare Methods: the same seed sampled with merge, switch, composite and cmlora, one labelled "
            "grid with each method's time and FLOPs relative to merge.",
            compare_methods, thumb_compare),
    Example("SD1.5 - CMLoRA with your three LoRAs",
            "SD1.5 base checkpoint (downloadable) and three LoRAs of your own through the Profiler, the "
            "Frequency Scheduler and the CMLoRA Sampler. Replace the YOUR_... LoRA files; see the note.",
            sd15_cmlora, lambda: thumb_cmlora("offline", badge="SD1.5 - your LoRAs", title="CMLoRA SD1.5",
                                              subtitle="your LoRAs, profiled and scheduled")),
    Example("SDXL - CLoRA two subjects with your LoRAs",
            "SDXL base checkpoint (downloadable), two subject LoRAs and a style LoRA of your own through the "
            "CLoRA Attention Masker and KSampler. Replace the YOUR_... LoRA files; see the note.",
            sdxl_clora, lambda: thumb_clora(badge="SDXL - your LoRAs", subjects=("cat", "dog"), title="CLoRA SDXL")),
]


def write(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for ex in EXAMPLES:
        if any(c in ex.name for c in '#?%&/\\:*"<>|'):
            raise ValueError(f"{ex.name!r}: the name becomes a URL and a file name; avoid #?%&/\\:*\"<>|")
        path = out / f"{ex.name}.json"
        path.write_text(json.dumps(ex.build().to_json(ex.name, ex.description), indent=1) + "\n")
        ex.thumbnail().save(out / f"{ex.name}.jpg", quality=90, optimize=True)
        written.append(path)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write the example workflows and their thumbnails.")
    ap.add_argument("--out", type=Path, default=OUT, help="folder to write (default: example_workflows/)")
    args = ap.parse_args(argv)
    stale = [p for p in args.out.glob("*.json")] + [p for p in args.out.glob("*.jpg")] if args.out.exists() else []
    written = write(args.out)
    keep = {p.name for p in written} | {p.with_suffix(".jpg").name for p in written}
    for p in stale:
        if p.name not in keep:
            p.unlink()
    print(f"{len(written)} example workflows in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
