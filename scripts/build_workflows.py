"""Write the example workflows (UI format, as the graph editor saves them).

    python scripts/build_workflows.py      # rewrites example_workflows/*.json

Each uses the demo checkpoint and LoRAs that scripts/make_fixtures.py generates, so they
run on a fresh install; artists swap in their own files from the dropdowns.
"""
from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "example_workflows"

# (type, outputs as (name, type)) of the nodes the examples use
OUTPUTS = {
    "CheckpointLoaderSimple": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    "CMLoRA_LoraStack": [("stack", "CMLORA_STACK")],
    "CMLoRA_ApplyClip": [("clip", "CLIP")],
    "CLIPTextEncode": [("CONDITIONING", "CONDITIONING")],
    "EmptyLatentImage": [("LATENT", "LATENT")],
    "CMLoRA_Sampler": [("LATENT", "LATENT"), ("report", "STRING")],
    "VAEDecode": [("IMAGE", "IMAGE")],
    "SaveImage": [],
    "PreviewImage": [],
    "CMLoRA_Profiler": [("profile", "CMLORA_PROFILE"), ("plot", "IMAGE")],
    "CMLoRA_FrequencyScheduler": [("schedule", "CMLORA_SCHEDULE"), ("timeline", "IMAGE")],
    "CLoRA_AttentionMasker": [("model", "MODEL"), ("positive", "CONDITIONING")],
    "CLoRA_Masks": [("masks", "MASK"), ("overlay", "IMAGE")],
    "KSampler": [("LATENT", "LATENT")],
}


class Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def add(self, type_, pos, widgets, size=(320, 160), title=None):
        node = {"id": len(self.nodes) + 1, "type": type_, "pos": list(pos), "size": list(size), "flags": {},
                "order": len(self.nodes), "mode": 0, "inputs": [],
                "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(OUTPUTS[type_])],
                "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets)}
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def link(self, src, slot, dst, name, type_):
        lid = len(self.links) + 1
        self.links.append([lid, src["id"], slot, dst["id"], len(dst["inputs"]), type_])
        src["outputs"][slot]["links"].append(lid)
        dst["inputs"].append({"name": name, "type": type_, "link": lid})

    def to_json(self, title):
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {},
                "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}, "info": {"title": title}}, "version": 0.4}


STACK = [
    # lora, strength_model, strength_clip, enabled, category, concept, trigger
    ("cmlora_demo_character.safetensors", 0.8, 0.8, True, "character", "cat", ""),
    ("cmlora_demo_style.safetensors", 0.8, 0.8, True, "style", "watercolor", ""),
    ("cmlora_demo_background.safetensors", 0.8, 0.8, True, "background", "mountains", ""),
]
PROMPT = "a cat in front of mountains, watercolor"


def checkpoint_and_stack(g: Graph, stack):
    """The demo checkpoint loader and a chain of LoRA Stack nodes; returns (loader, last stack node)."""
    ckpt = g.add("CheckpointLoaderSimple", (0, 0), ["cmlora_tiny_sd15.safetensors"], (300, 100))
    prev = None
    for i, values in enumerate(stack):
        node = g.add("CMLoRA_LoraStack", (360, i * 230), values, (320, 210))
        if prev is not None:
            g.link(prev, 0, node, "stack", "CMLORA_STACK")
        prev = node
    return ckpt, prev


def composition(method: str, interval: int = 2, steps: int = 6, stack=STACK, schedule_mode=None):
    g = Graph()
    ckpt, prev = checkpoint_and_stack(g, stack)
    clip = g.add("CMLoRA_ApplyClip", (720, 0), [], (240, 50))
    g.link(ckpt, 1, clip, "clip", "CLIP")
    g.link(prev, 0, clip, "stack", "CMLORA_STACK")
    pos = g.add("CLIPTextEncode", (720, 120), [PROMPT], (300, 120), "Positive")
    neg = g.add("CLIPTextEncode", (720, 280), ["blurry, lowres"], (300, 120), "Negative")
    g.link(clip, 0, pos, "clip", "CLIP")
    g.link(clip, 0, neg, "clip", "CLIP")
    empty = g.add("EmptyLatentImage", (720, 440), [64, 64, 1], (300, 110))
    sampler = g.add("CMLoRA_Sampler", (1080, 0),
                    [method, interval, 42, "fixed", steps, 6.0, "euler", "normal", 1.0], (320, 360))
    g.link(ckpt, 0, sampler, "model", "MODEL")
    g.link(prev, 0, sampler, "stack", "CMLORA_STACK")
    g.link(pos, 0, sampler, "positive", "CONDITIONING")
    g.link(neg, 0, sampler, "negative", "CONDITIONING")
    g.link(empty, 0, sampler, "latent_image", "LATENT")
    decode = g.add("VAEDecode", (1440, 0), [], (200, 50))
    g.link(sampler, 0, decode, "samples", "LATENT")
    g.link(ckpt, 2, decode, "vae", "VAE")
    save = g.add("SaveImage", (1440, 100), [f"cmlora_{schedule_mode or method}"], (300, 300))
    g.link(decode, 0, save, "images", "IMAGE")
    if schedule_mode:
        profiler = g.add("CMLoRA_Profiler", (1080, 420), [42, steps, 6.0, "euler", "normal"], (320, 300))
        for src, slot, name, type_ in ((ckpt, 0, "model", "MODEL"), (prev, 0, "stack", "CMLORA_STACK"),
                                       (pos, 0, "positive", "CONDITIONING"), (neg, 0, "negative", "CONDITIONING"),
                                       (empty, 0, "latent_image", "LATENT"), (ckpt, 2, "vae", "VAE")):
            g.link(src, slot, profiler, name, type_)
        threshold = 0.96 if schedule_mode == "online" else 0.5
        scheduler = g.add("CMLoRA_FrequencyScheduler", (1440, 420),
                          [schedule_mode, 2, "deep", "nonuniform", 2, 0.55, threshold, "constant", True, steps],
                          (320, 330))
        g.link(profiler, 0, scheduler, "profile", "CMLORA_PROFILE")
        g.link(scheduler, 0, sampler, "schedule", "CMLORA_SCHEDULE")
        plot = g.add("PreviewImage", (1800, 0), [], (460, 300), "Profile plot")
        g.link(profiler, 1, plot, "images", "IMAGE")
        timeline = g.add("PreviewImage", (1800, 340), [], (460, 300), "Schedule timeline")
        g.link(scheduler, 1, timeline, "images", "IMAGE")
    return g


PROFILED_STACK = [
    ("cmlora_demo_character.safetensors", 0.8, 0.8, True, "auto", "cat", ""),
    ("cmlora_demo_style.safetensors", 0.8, 0.8, True, "auto", "watercolor", ""),
    ("cmlora_demo_background.safetensors", 0.8, 0.8, True, "background", "mountains", ""),
]


CLORA_STACK = [
    ("cmlora_demo_character.safetensors", 1.0, 1.0, True, "character", "cat", ""),
    ("cmlora_demo_background.safetensors", 1.0, 1.0, True, "background", "mountains", ""),
    ("cmlora_demo_style.safetensors", 0.8, 0.8, True, "style", "", ""),
]


def clora(steps: int = 6):
    """Two subject LoRAs and a style LoRA through the CLoRA Attention Masker and a stock KSampler."""
    g = Graph()
    ckpt, prev = checkpoint_and_stack(g, CLORA_STACK)
    masker = g.add("CLoRA_AttentionMasker", (720, 0),
                   [PROMPT, 0.5, 20.0, 0.5, 3, 0.4, "conditional", "global"], (340, 330))
    g.link(ckpt, 0, masker, "model", "MODEL")
    g.link(ckpt, 1, masker, "clip", "CLIP")
    g.link(prev, 0, masker, "stack", "CMLORA_STACK")
    neg = g.add("CLIPTextEncode", (720, 380), ["blurry, lowres"], (300, 120), "Negative")
    g.link(ckpt, 1, neg, "clip", "CLIP")
    empty = g.add("EmptyLatentImage", (720, 540), [128, 128, 1], (300, 110))
    sampler = g.add("KSampler", (1100, 0), [42, "fixed", steps, 5.0, "euler", "normal", 1.0], (320, 270))
    g.link(masker, 0, sampler, "model", "MODEL")
    g.link(masker, 1, sampler, "positive", "CONDITIONING")
    g.link(neg, 0, sampler, "negative", "CONDITIONING")
    g.link(empty, 0, sampler, "latent_image", "LATENT")
    decode = g.add("VAEDecode", (1460, 0), [], (200, 50))
    g.link(sampler, 0, decode, "samples", "LATENT")
    g.link(ckpt, 2, decode, "vae", "VAE")
    save = g.add("SaveImage", (1460, 100), ["clora_two_subjects"], (300, 300))
    g.link(decode, 0, save, "images", "IMAGE")
    masks = g.add("CLoRA_Masks", (1100, 320), [-1], (320, 120))
    g.link(masker, 0, masks, "model", "MODEL")
    g.link(sampler, 0, masks, "samples", "LATENT")
    g.link(decode, 0, masks, "image", "IMAGE")
    preview = g.add("PreviewImage", (1800, 0), [], (300, 300), "CLoRA masks")
    g.link(masks, 1, preview, "images", "IMAGE")
    return g


WORKFLOWS = {
    "clora_two_subjects": ("CLoRA: a cat LoRA and a mountains LoRA kept apart, a style LoRA everywhere", clora),
    "cmlora_merge": ("Merge: three LoRAs in the weights", lambda: composition("merge")),
    "cmlora_switch": ("LoRA Switch: one LoRA per step, rotating every 2 steps", lambda: composition("switch")),
    "cmlora_composite": ("LoRA Composite: every LoRA's prediction averaged each step", lambda: composition("composite")),
    **{f"cmlora_{mode}": (f"CMLoRA ({mode}): profiler -> frequency scheduler -> sampler",
                          (lambda mode=mode: composition("cmlora", stack=PROFILED_STACK, schedule_mode=mode)))
       for mode in ("offline", "online", "async")},
}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, (title, build) in WORKFLOWS.items():
        (OUT / f"{name}.json").write_text(json.dumps(build().to_json(title), indent=1) + "\n")


if __name__ == "__main__":
    main()
