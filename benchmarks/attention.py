"""The host's attention choices on the CPU, side by side in one process: what the test suite, its
ComfyUI server and the demo run on.

On a CPU the host picks its sub-quadratic attention unless started with
``--use-pytorch-cross-attention``. This part samples the demo checkpoint (the generated
SD1.5-layout model the tests and the demo use) with merge of its three LoRAs at the sizes they
use — 64x64 (the demo and most tests) and 256x256 (CLoRA's mask tests) — once with each of the
host's attention functions, as the host calls them (its module-level ``optimized_attention``,
which every cross- and self-attention layer of the UNet looks up per call). Rounds rotate the
order; the model is loaded outside the clock. Each row also gives the largest difference of the
sampled latent from the sub-quadratic one's.
"""
from __future__ import annotations

import statistics
import time

SIZES, STEPS, CFG = (64, 256), 4, 5.0
FUNCTIONS = ("sub_quad", "pytorch", "split", "basic")  # the host's attention_<name> functions


def run_attention(rounds: int) -> dict:
    import comfy.ldm.modules.attention as attention
    import nodes as host_nodes
    import torch
    from comfyui_cmlora.nodes import host

    from .demo_switch import demo_files

    loras, model, pos, neg = demo_files()
    for name in loras:
        model = host_nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 0.8)[0]
    chosen = (attention.optimized_attention, attention.optimized_attention_masked)

    def run(name: str, side: int):
        attention.optimized_attention = attention.optimized_attention_masked = getattr(attention, f"attention_{name}")
        latent = {"samples": torch.zeros(1, 4, side // 8, side // 8)}
        started = time.perf_counter()
        with torch.inference_mode():
            out = host.ksampler(model, 42, STEPS, CFG, "euler", "normal", pos, neg, latent)
        return time.perf_counter() - started, out

    seconds = {side: {f: [] for f in FUNCTIONS} for side in SIZES}
    diff = {side: {} for side in SIZES}
    try:
        host.load_model(model)
        for side in SIZES:
            run(FUNCTIONS[0], side)  # warm-up
            latents = {}
            for r in range(rounds):
                order = FUNCTIONS[r % len(FUNCTIONS):] + FUNCTIONS[:r % len(FUNCTIONS)]
                for f in order:
                    s, latents[f] = run(f, side)
                    seconds[side][f].append(s)
            ref = _samples(latents["sub_quad"])
            diff[side] = {f: float((_samples(latents[f]) - ref).abs().max()) for f in FUNCTIONS}
    finally:
        attention.optimized_attention, attention.optimized_attention_masked = chosen
        host.unload_models()
    return {"seconds": {str(k): v for k, v in seconds.items()}, "diff": {str(k): v for k, v in diff.items()},
            "steps": STEPS}


def _samples(out):
    return out["samples"] if isinstance(out, dict) else out


def attention_section(results: dict) -> str:
    lines = ["### Attention on the CPU",
             "",
             f"The demo checkpoint with its three LoRAs merged, {results['steps']} euler steps at cfg {CFG}, "
             "median seconds per image of each of the host's attention functions and the ratio to "
             "sub-quadratic (the host's choice on a CPU); the last column is the largest difference of the "
             "sampled latent from sub-quadratic's.",
             "",
             "| image | attention | median s | spread | speed vs sub_quad | max latent difference |",
             "|---|---|---|---|---|---|"]
    for side, per in results["seconds"].items():
        base = statistics.median(per["sub_quad"])
        for f, times in per.items():
            med = statistics.median(times)
            lines.append(f"| {side}x{side} | {f} | {med:.2f} | {min(times):.2f}-{max(times):.2f} | "
                         f"{base / med:.2f}x | {results['diff'][side][f]:.1e} |")
    return "\n".join(lines)
