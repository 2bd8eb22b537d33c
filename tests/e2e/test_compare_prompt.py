"""CMLoRA Compare Methods through the real server's /prompt: the grid is saved, previewed on the node, reported."""
from __future__ import annotations

import re
import sys

import numpy as np
from PIL import Image

from _host import REPO

sys.path.insert(0, str(REPO / "scripts"))
from comfy_client import output_images, output_texts  # noqa: E402

CKPT = "cmlora_tiny_sd15.safetensors"
METHODS = ["merge", "switch", "composite", "cmlora"]


def _prompt(methods: str, with_schedule: bool = True) -> dict:
    def n(cls, **inputs):
        return {"class_type": cls, "inputs": inputs}

    def stack(lora, category, prev=None):
        node = n("CMLoRA_LoraStack", lora_name=lora, strength_model=0.9, strength_clip=0.9, enabled=True,
                 category=category, concept="", trigger="")
        if prev:
            node["inputs"]["stack"] = [prev, 0]
        return node

    compare = n("CMLoRA_CompareMethods", model=["1", 0], stack=["11", 0], positive=["2", 0], negative=["3", 0],
                latent_image=["4", 0], vae=["1", 2], seed=3, steps=3, cfg=5.0, sampler_name="euler",
                scheduler="normal", methods=methods, switch_interval=1)
    prompt = {
        "1": n("CheckpointLoaderSimple", ckpt_name=CKPT),
        "2": n("CLIPTextEncode", text="a cat in a garden", clip=["1", 1]),
        "3": n("CLIPTextEncode", text="blurry", clip=["1", 1]),
        "4": n("EmptyLatentImage", width=64, height=64, batch_size=1),
        "10": stack("test_kohya.safetensors", "character"),
        "11": stack("test_locon.safetensors", "background", prev="10"),
        "20": compare,
        "21": n("SaveImage", images=["20", 0], filename_prefix="compare"),
    }
    if with_schedule:
        prompt["12"] = n("CMLoRA_FrequencyScheduler", stack=["11", 0], mode="offline", switch_interval=1,
                         cache="deep", refresh="nonuniform", refresh_interval=2, h_to_l_fraction=0.5,
                         online_threshold=0.5, w_dom="constant", dominant_full=True, preview_steps=4)
        compare["inputs"]["schedule"] = ["12", 0]
    return prompt


def test_compare_node_through_prompt_gives_one_labelled_grid(server):
    info = server.get("/object_info")["CMLoRA_CompareMethods"]
    assert info["display_name"] == "CMLoRA Compare Methods" and info["category"] == "sampling/cmlora"
    assert info["output_node"] is True
    assert info["input"]["required"]["seed"][1]["control_after_generate"] is True
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            assert (spec[1] if len(spec) > 1 else {}).get("tooltip"), f"{name} has no tooltip"

    entry = server.run(_prompt(", ".join(METHODS)))
    saved = output_images(entry)
    assert len(saved) == 1  # one grid image, whatever the number of methods
    grid = Image.open(server.output_dir_path / saved[0].get("subfolder", "") / saved[0]["filename"]).convert("RGB")
    assert grid.width >= len(METHODS) * 64 and grid.height > 64  # four 64-pixel tiles and a label strip
    pixels = np.asarray(grid)
    strip = pixels[-20:]
    assert strip.std() > 5  # text in the label strip

    node_out = entry["outputs"]["20"]
    assert len([i for i in node_out["images"] if i["type"] == "temp"]) == 1  # the grid, previewed on the node
    report = next(t for t in output_texts(entry) if t.startswith("CMLoRA Compare Methods"))
    found = re.findall(r"^(\w+): [\d.]+ s .*?, ([\d.]+)x the model FLOPs of merge", report, re.M)
    assert [m for m, _ in found] == METHODS
    ratios = {m: float(r) for m, r in found}
    # merge folds the LoRAs into the weights; composite runs a copy of the rows per LoRA (two) and adds
    # its LoRAs' products (rank 4 on this 320-channel model: about 1%; tests/host/test_compare.py checks
    # the figure against torch's own count of the run)
    assert ratios["merge"] == 1.0 and 2.0 < ratios["composite"] < 2.1, ratios


def test_cmlora_without_a_schedule_fails_naming_node_input_and_fix(server):
    kind, result = server.outcome(_prompt("merge, cmlora", with_schedule=False))
    assert kind == "error"
    assert result["node_type"] == "CMLoRA_CompareMethods"
    assert re.match(r"\[CMLoRA Compare Methods\] input 'schedule': .+ Fix: connect a 'CMLoRA Frequency Scheduler'",
                    result["exception_message"])
