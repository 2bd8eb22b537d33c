"""The real ComfyUI server with the pack: node listing, and every example workflow via /prompt."""
from __future__ import annotations

import json
import sys

import pytest
from PIL import Image

from _host import REPO

sys.path.insert(0, str(REPO / "scripts"))
from comfy_client import output_images, output_texts, ui_to_api  # noqa: E402

NODE_IDS = ["CMLoRA_LoraStack", "CMLoRA_StackFromLoraStack", "CMLoRA_ApplyClip", "CMLoRA_Apply", "CMLoRA_Sampler",
            "CMLoRA_Profiler", "CMLoRA_FrequencyScheduler", "CMLoRA_SaveProfile", "CMLoRA_LoadProfile",
            "CLoRA_AttentionMasker", "CLoRA_Masks"]
WORKFLOWS = sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))


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


def test_example_workflows_have_thumbnails():
    assert WORKFLOWS, "no example workflows"
    for name in WORKFLOWS:
        assert (REPO / "example_workflows" / f"{name}.jpg").exists(), f"{name} has no thumbnail"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_example_workflow_runs_through_prompt_api(server, name):
    workflow = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
    entry = server.run(ui_to_api(workflow, server.get("/object_info")))
    images = output_images(entry)
    assert images, "no image saved"
    path = server.output_dir_path / images[0].get("subfolder", "") / images[0]["filename"]
    img = Image.open(path)
    if name.startswith("clora"):
        assert img.size == (128, 128)
        assert len(output_images(entry, "temp")) == 1  # the mask overlay
        return
    assert img.size == (64, 64)
    reports = [t for t in output_texts(entry) if t.startswith("method ")]
    assert reports and "3 LoRAs" in reports[0]
    if name in ("cmlora_offline", "cmlora_online", "cmlora_async"):
        assert f"({name.split('_')[1]}, cache deep)" in reports[0] and "x the UNet FLOPs of merge" in reports[0]
        previews = output_images(entry, "temp")
        assert len(previews) == 2  # the profile plot and the schedule timeline


def test_bad_input_is_reported_by_the_server(server):
    """A LoRA for another base model fails the prompt with the pack's message."""
    workflow = json.loads((REPO / "example_workflows" / "cmlora_composite.json").read_text())
    for node in workflow["nodes"]:
        if node["type"] == "CMLoRA_LoraStack":
            node["widgets_values"][0] = "test_sdxl_kohya.safetensors"
            break
    with pytest.raises(RuntimeError, match="test_sdxl_kohya.safetensors"):
        server.run(ui_to_api(workflow, server.get("/object_info")))
