"""The real ComfyUI server with the pack: node listing, and a bad input reported (examples: test_examples.py)."""
from __future__ import annotations

import json
import sys

import pytest

from _host import REPO

sys.path.insert(0, str(REPO / "scripts"))
from comfy_client import ui_to_api  # noqa: E402

NODE_IDS = ["CMLoRA_LoraStack", "CMLoRA_StackFromLoraStack", "CMLoRA_ApplyClip", "CMLoRA_Apply", "CMLoRA_Sampler",
            "CMLoRA_Profiler", "CMLoRA_FrequencyScheduler", "CMLoRA_SaveProfile", "CMLoRA_LoadProfile",
            "CLoRA_AttentionMasker", "CLoRA_Masks", "CLoRA_SaveMasks", "CLoRA_LoadMasks", "CMLoRA_CompareMethods"]


def test_object_info_lists_every_node_with_tooltips(server):
    info = server.get("/object_info")
    for node_id in NODE_IDS:
        assert node_id in info, f"{node_id} missing from /object_info"
        node = info[node_id]
        assert node["python_module"].startswith("custom_nodes.")
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                opts = spec[1] if len(spec) > 1 else {}
                assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert "cmlora_demo_character.safetensors" in info["CMLoRA_LoraStack"]["input"]["required"]["lora_name"][1]["options"]


def test_bad_input_is_reported_by_the_server(server):
    """A LoRA for another base model fails the prompt with the pack's message (on the example
    that samples with CMLoRA Sampler's composite; tests/e2e/test_examples.py runs them all)."""
    workflow = next(w for w in (json.loads(p.read_text()) for p in sorted((REPO / "example_workflows").glob("*.json")))
                    if any(n["type"] == "CMLoRA_Sampler" and n["widgets_values"][0] == "composite"
                           for n in w["nodes"]))
    for node in workflow["nodes"]:
        if node["type"] == "CMLoRA_LoraStack":
            node["widgets_values"][0] = "test_sdxl_kohya.safetensors"
            break
    with pytest.raises(RuntimeError, match="test_sdxl_kohya.safetensors"):
        server.run(ui_to_api(workflow, server.get("/object_info")))
