"""Wall time and peak memory of every method beside merge, measured in one process, alternating.

One worker process builds the model once (a small SD1.5-layout UNet (harness.SMALL) on
the CPU, or the full-size SD1.5 UNet in fp16 on CUDA, random weights either way), runs every
case briefly untimed (warm-up: first-call allocations, the host loading the model, CMLoRA's
one-time FLOP probe), then runs rounds: in each round every case once, in a rotated order, so slow
drifts of the machine spread over all methods alike. Reported: the median over rounds, the
spread (min-max), and the median over rounds of the per-round ratio to merge with the same N.

Peak memory: on CUDA, ``max_memory_allocated`` during the run minus the memory allocated
before it. On the CPU, the highest resident set size seen while sampling (polled every
millisecond) minus the size just before; the worker runs with ``MALLOC_MMAP_THRESHOLD_`` fixed
so that freed tensors go back to the system at once and every run starts from the same level.
"""
from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict

from .harness import Case

SETTINGS = {
    "cpu": {"arch": "small", "steps": 8, "dtype": "float32"},  # image sizes: harness.ARCHS
    "cuda": {"arch": "sd15", "steps": 30, "dtype": "float16"},
}


def timing_cases(ns=range(1, 6)) -> list[Case]:
    """Merge, switch and composite for N = 1..5; composite as N sequential forwards and CMLoRA
    (offline, deep cache) for N = 2..5 (with one LoRA both are plain composite); CLoRA with two."""
    out = []
    for n in ns:
        out += [Case("merge", n), Case("switch", n), Case("composite", n)]
        if n >= 2:
            out += [Case("composite-seq", n), Case("cmlora", n)]
    out.append(Case("clora", 2))
    return out


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class Meter:
    """Seconds of a sampling call and the peak memory of loading plus sampling.

    The clock covers sampling only: the host folds merge's LoRAs when it loads the model,
    once per workflow rather than per image. Memory counts from before the load, so that
    merge's weight backups and switch's refolded copies are both included.
    """

    def __init__(self, device: str):
        self.device = device

    def measure(self, load, fn) -> tuple[float, int]:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            load()
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            return time.perf_counter() - start, torch.cuda.max_memory_allocated() - before
        _trim()
        before, peak, stop = _rss(), [0], threading.Event()

        def poll():
            while not stop.is_set():
                peak[0] = max(peak[0], _rss())
                time.sleep(0.001)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        try:
            load()
            start = time.perf_counter()
            fn()
            seconds = time.perf_counter() - start
        finally:
            stop.set()
            watcher.join()
        return seconds, max(peak[0], _rss()) - before


def worker(device: str, rounds: int, cases: list[Case]) -> list[dict]:
    """Runs in its own process (see run_timing)."""
    import torch

    from .harness import build_model, import_host, mapped_loras, patched_model, sample

    os.environ["CMLORA_BENCH_DEVICE"] = device
    import_host()
    from comfyui_cmlora.nodes import host
    s = SETTINGS[device]
    dtype = getattr(torch, s["dtype"])
    torch.manual_seed(0)
    with torch.inference_mode():
        model = build_model(s["arch"], device, dtype)
        loras = mapped_loras(model, max(c.n for c in cases), 32, device, dtype)
    built = [(c, *patched_model(c, model, loras, s["arch"])) for c in cases]
    meter = Meter(device)

    def run(m, pos, neg):
        sample(m, pos, neg, s["arch"], s["steps"])

    for c, m, pos, neg in built:  # warm-up: first-call allocations, the host loading the model
        if c.method != "clora":  # (CLoRA's first step alone runs 61 loss passes; its first round warms it)
            sample(m, pos, neg, s["arch"], c.n if c.method == "cmlora" else 1)
    results = []
    for r in range(rounds):
        order = built[r % len(built):] + built[:r % len(built)]
        for c, m, pos, neg in order:
            host.unload_models()  # every case starts from the unpatched model, as after a workflow change
            seconds, peak = meter.measure(functools.partial(host.load_model, m), functools.partial(run, m, pos, neg))
            results.append({"round": r, "case": asdict(c), "seconds": seconds, "peak_bytes": peak})
            print(f"  round {r + 1}/{rounds} {c.label} N={c.n}: {seconds:.2f}s", file=sys.stderr, flush=True)
    return results


def run_timing(device: str, rounds: int, cases: list[Case] | None = None) -> list[dict]:
    """The timing worker in a fresh process; returns its measurements."""
    cases = cases or timing_cases()
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "CMLORA_BENCH_DEVICE": device}
    payload = json.dumps({"device": device, "rounds": rounds, "cases": [asdict(c) for c in cases]})
    cmd = [sys.executable, "-m", "benchmarks.timing", payload]
    from .harness import REPO

    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"timing worker failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(results: list[dict]) -> list[dict]:
    """Per case: median seconds and peak, spread, median per-round ratios to merge with the same N."""
    by_case: dict[tuple, list[dict]] = {}
    for r in results:
        by_case.setdefault(tuple(sorted(r["case"].items())), []).append(r)
    merge = {}
    for key, runs in by_case.items():
        case = dict(key)
        if case["method"] == "merge":
            merge[case["n"]] = {r["round"]: r for r in runs}
    rows = []
    for key, runs in by_case.items():
        case = Case(**dict(key))
        secs = [r["seconds"] for r in runs]
        peaks = [r["peak_bytes"] for r in runs]
        ref = merge.get(case.n, {})
        t_ratio = [r["seconds"] / ref[r["round"]]["seconds"] for r in runs if r["round"] in ref]
        m_ratio = [r["peak_bytes"] / ref[r["round"]]["peak_bytes"] for r in runs
                   if r["round"] in ref and ref[r["round"]]["peak_bytes"] > 0]
        rows.append({"case": case, "seconds": statistics.median(secs), "min": min(secs), "max": max(secs),
                     "time_ratio": statistics.median(t_ratio) if t_ratio else None,
                     "peak": statistics.median(peaks), "peak_ratio": statistics.median(m_ratio) if m_ratio else None})
    return rows


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    out = worker(args["device"], args["rounds"], [Case(**c) for c in args["cases"]])
    print(json.dumps(out))
