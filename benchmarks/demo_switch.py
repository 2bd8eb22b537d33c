"""Switch against merge on the demo's checkpoint and three LoRAs, side by side in one process.

The demo's own files (the generated SD1.5-layout checkpoint, the character, style and
background LoRAs at strength 0.8), 256x256, 6 steps, euler/normal, cfg 6, switch_interval 2
(three refolds per run). As in the timing part, the model is loaded outside the clock and
only sampling is timed: merge's LoRAs are folded at load, once per workflow, while switch
refolds during every run, so its refolds are inside its time. Rounds rotate the order.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from .harness import REPO

SIDE, STEPS, CFG, INTERVAL, STRENGTH = 256, 6, 6.0, 2, 0.8


def demo_files():
    """The demo's checkpoint and LoRAs (written once under .cache/bench-demo-models, registered with
    the host), loaded by the host's CheckpointLoaderSimple, and the demo's prompts encoded:
    (LoRA file names, model, positive, negative)."""
    import folder_paths
    import make_fixtures
    import nodes as host_nodes

    models = Path(REPO / ".cache" / "bench-demo-models")
    files = make_fixtures.ensure_demo_models(models)
    folder_paths.add_model_folder_path("checkpoints", str(models / "checkpoints"), is_default=True)
    folder_paths.add_model_folder_path("loras", str(models / "loras"), is_default=True)
    model, clip, _ = host_nodes.CheckpointLoaderSimple().load_checkpoint(files["checkpoint"])
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a cat in front of mountains, watercolor"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize("blurry, lowres"))
    return files["loras"], model, pos, neg


def run_demo_switch(rounds: int) -> dict:
    import torch
    from comfyui_cmlora.cmlora_core.stack import LoraEntry
    from comfyui_cmlora.nodes import host
    from comfyui_cmlora.nodes.loras import lora_file_path, map_model_lora
    from comfyui_cmlora.nodes.methods import apply_method

    loras, model, pos, neg = demo_files()
    mapped = [map_model_lora(model, LoraEntry(n, lora_file_path(n, "benchmark"), STRENGTH, STRENGTH), "benchmark")
              for n in loras]
    latent = {"samples": torch.zeros(1, 4, SIDE // 8, SIDE // 8)}

    def run(method: str) -> float:
        patched = apply_method(model, mapped, method, INTERVAL, "benchmark")
        host.unload_models()
        host.load_model(patched)
        started = time.perf_counter()
        with torch.inference_mode():
            host.ksampler(patched, 42, STEPS, CFG, "euler", "normal", pos, neg, latent)
        return time.perf_counter() - started

    methods = ["merge", "switch"]
    for m in methods:  # warm-up: file reading, first-touch allocations
        run(m)
    seconds: dict = {m: [] for m in methods}
    for r in range(rounds):
        for m in methods[r % 2:] + methods[:r % 2]:
            seconds[m].append(run(m))
    host.unload_models()
    return {"seconds": seconds, "loras": loras}


def demo_switch_section(result: dict) -> str:
    merge, switch = result["seconds"]["merge"], result["seconds"]["switch"]
    ratios = [s / m for s, m in zip(switch, merge)]
    ratio = statistics.median(switch) / statistics.median(merge)
    lines = [f"Switch vs merge on the demo's checkpoint and LoRAs ({', '.join(result['loras'])}), {SIDE}x{SIDE}, "
             f"{STEPS} steps, switch_interval {INTERVAL}; sampling only, the model loaded before the clock:", "",
             "| method | median s | per round s |", "|---|---|---|"]
    for name, values in (("merge", merge), ("switch", switch)):
        lines.append(f"| {name} | {statistics.median(values):.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
    lines += ["", f"- switch / merge: {ratio:.2f} (per round {', '.join(f'{r:.2f}' for r in ratios)}); "
                  f"target at most 1.1: {'met' if ratio <= 1.1 else 'NOT met'}."]
    return "\n".join(lines)
