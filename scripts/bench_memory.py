"""Peak memory of CLoRA (two subject LoRAs) beside plain composite and merge, measured in one run.

    .venv/bin/python scripts/bench_memory.py [--size 256] [--steps 6] [--device cpu|cuda]

Each method runs in a fresh process on the generated SD1.5-architecture model (see
scripts/make_fixtures.py) with the same prompt, seed and settings; the methods alternate
over --repeats rounds. On the CPU the peak is the highest resident set size seen while
sampling (sampled every 2 ms) minus the size just before; on CUDA it is
torch.cuda.max_memory_allocated over the run minus the memory allocated before.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOST = Path(os.environ.get("COMFYUI_PATH") or REPO / ".host" / "ComfyUI")
MODELS = REPO / ".cache" / "bench-models"
METHODS = ("merge", "composite", "clora")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(method: str, size: int, steps: int, device: str) -> dict:
    sys.path[:0] = [str(HOST / "custom_nodes"), str(HOST), str(REPO / "scripts")]
    from comfy.cli_args import args

    args.cpu = device == "cpu"
    import torch

    import comfy.sample
    import folder_paths
    import make_fixtures as fx
    import nodes as host_nodes

    folder_paths.add_model_folder_path("checkpoints", str(MODELS / "checkpoints"), is_default=True)
    folder_paths.add_model_folder_path("loras", str(MODELS / "loras"), is_default=True)
    from comfyui_cmlora.nodes.apply_nodes import ApplyNode
    from comfyui_cmlora.nodes.clora_nodes import AttentionMasker
    from comfyui_cmlora.nodes.stack_nodes import LoraStackNode

    model, clip, _ = host_nodes.CheckpointLoaderSimple().load_checkpoint(fx.CHECKPOINT)
    st = None
    for name, cat, concept in (("cmlora_demo_character.safetensors", "character", "cat"),
                               ("cmlora_demo_background.safetensors", "background", "mountains")):
        st = LoraStackNode.execute(lora_name=name, strength_model=1.0, strength_clip=1.0, enabled=True, category=cat,
                                   concept=concept, trigger="", stack=st).args[0]
    prompt = "a cat in front of mountains"
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    if method == "clora":
        patched, pos = AttentionMasker.execute(model=model, clip=clip, stack=st, prompt=prompt, temperature=0.5,
                                               step_size=20.0, stop_fraction=0.5, extra_iterations=20,
                                               mask_threshold=0.4, attention="conditional",
                                               style_scope="global").args
    else:
        patched = ApplyNode.execute(model=model, stack=st, method=method, switch_interval=5).args[0]
        pos = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
    lat = torch.zeros(1, 4, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(lat, 1)

    def run():
        return comfy.sample.sample(patched, noise, steps, 5.0, "euler", "normal", pos, neg, lat, seed=1,
                                   disable_pbar=True)

    with torch.inference_mode():  # as the host's executor runs nodes
        comfy.sample.sample(patched, noise, 1, 5.0, "euler", "normal", pos, neg, lat, seed=1, disable_pbar=True)
        if device == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            run()
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() - before
        else:
            before, peak_rss, stop = _rss(), [0], threading.Event()

            def watch():
                while not stop.is_set():
                    peak_rss[0] = max(peak_rss[0], _rss())
                    time.sleep(0.002)

            t = threading.Thread(target=watch)
            t.start()
            start = time.perf_counter()
            run()
            seconds = time.perf_counter() - start
            stop.set()
            t.join()
            peak = max(peak_rss[0], _rss()) - before
    return {"method": method, "peak_bytes": peak, "seconds": seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.size, args.steps, args.device)))
        return 0
    env = {**os.environ, "PYTHONPATH": str(HOST)}
    prep = [sys.executable, str(REPO / "scripts" / "make_fixtures.py"), "--models-dir", str(MODELS)]
    subprocess.run(prep, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results: dict[str, list] = {m: [] for m in METHODS}
    for _ in range(args.repeats):
        for m in METHODS:
            cmd = [sys.executable, __file__, "--child", m, "--size", str(args.size), "--steps", str(args.steps),
                   "--device", args.device]
            out = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True).stdout
            results[m].append(json.loads(out.strip().splitlines()[-1]))
    base = statistics.median(r["peak_bytes"] for r in results["composite"])
    print(f"Peak memory while sampling, two LoRAs, {args.size}x{args.size}, {args.steps} steps, euler, "
          f"{args.device}, median of {args.repeats} (alternating runs)")
    print(f"{'method':<10} {'peak MiB':>9} {'vs composite':>13} {'seconds':>8}")
    for m in METHODS:
        peak = statistics.median(r["peak_bytes"] for r in results[m])
        secs = statistics.median(r["seconds"] for r in results[m])
        print(f"{m:<10} {peak / 2**20:>9.1f} {peak / base:>12.2f}x {secs:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
