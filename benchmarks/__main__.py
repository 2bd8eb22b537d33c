"""python -m benchmarks: FLOPs, wall time and peak memory of every method, side by side.

    python -m benchmarks                       FLOPs (SD1.5 + SDXL, meta device) and CPU timing, ~7 min
    python -m benchmarks --part flops --archs flux   the Flux.1 FLOP table only
    python -m benchmarks --device cuda         timing at full size in fp16 on a CUDA GPU
    python -m benchmarks --full                every SDXL case too (about 20 minutes more)
    python -m benchmarks --part attention      the host's attention functions on the CPU, ~3 min
    python -m benchmarks --markdown BENCHMARKS.md   also write the tables into that file

Tables are printed as Markdown; see BENCHMARKS.md for what each number means.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context

from . import report
from .flops import flop_task
from .harness import CMLORA_CACHES, CMLORA_MODES, REPO, Case, import_host

MARKER = "<!-- benchmark output{}: {} -->"  # where --markdown writes; --section names another pair
RESULTS = REPO / ".cache" / "bench" / "results.json"  # raw results of the last run (--report-only reads them)
STEPS = 30


def flop_cases(arch: str, full: bool) -> list[Case]:
    """Merge, switch, composite for N = 1..5; CMLoRA for N = 2..5 in each schedule mode and each
    cache mode, and with the dominant LoRA shallow between refreshes; CLoRA (with and without its
    latent updates) for N = 1..2. --full: every mode x cache pair, CLoRA up to N = 5, and all of
    it for SDXL too (by default SDXL gets merge, switch, composite and CMLoRA offline/deep)."""
    variants = [("offline", "deep", True), ("offline", "prediction", True), ("offline", "none", True),
                ("online", "deep", True), ("async", "deep", True), ("offline", "deep", False)]
    if full:
        variants = [(m, c, True) for m in CMLORA_MODES for c in CMLORA_CACHES] + [("offline", "deep", False)]
    light = arch == "sdxl" and not full
    out = []
    for n in range(1, 6):
        out += [Case("merge", n), Case("switch", n), Case("composite", n)]
        if arch == "flux":  # the methods Flux's table compares (CMLoRA's deep cache and CLoRA need a UNet)
            continue
        if n >= 2:
            out += [Case("cmlora", n, m, c, d) for m, c, d in (variants[:1] if light else variants)]
        if not light and (full or n <= 2):
            out.append(Case("clora", n))
            if n >= 2:
                out.append(Case("clora", n, updates=False))
    return out


def _cost_order(item) -> float:
    arch, case = item
    weight = {"clora": 40, "composite": 3, "cmlora": 3}.get(case.method if case else "", 1)
    return -(weight * (case.n if case else 1) * {"sdxl": 3, "flux": 6}.get(arch, 1))


def run_flops(archs: list[str], full: bool, workers: int) -> dict:
    tasks = [(a, None) for a in archs] + [(a, c) for a in archs for c in flop_cases(a, full)]
    tasks.sort(key=_cost_order)
    out: dict = {a: {"costs": None, "runs": []} for a in archs}
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        for arch, case, value in pool.map(flop_task, [a for a, _ in tasks], [c for _, c in tasks], [STEPS] * len(tasks)):
            if case is None:
                out[arch]["costs"] = value
            else:
                out[arch]["runs"].append({"case": asdict(case), **value})
    print(f"(FLOP counting: {len(tasks)} runs in {time.perf_counter() - started:.0f} s with {workers} workers)",
          file=sys.stderr)
    return out


def machine(device: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
    if device == "cuda" and torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(0)}"
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the timing part runs (FLOPs are counted without a device)")
    ap.add_argument("--part", choices=("all", "flops", "time", "demo-switch", "attention"), default=None,
                    help="default: all on the CPU, time on CUDA")
    ap.add_argument("--archs", default="sd15,sdxl", help="FLOP architectures (sd15, sdxl, flux)")
    ap.add_argument("--full", action="store_true", help="every SDXL case (CLoRA, every CMLoRA variant)")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds (each case once per round)")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="FLOP counting processes")
    ap.add_argument("--markdown", help="write the tables into this file, between the benchmark-output markers")
    ap.add_argument("--section", default="", help="write between the markers of this name (e.g. sd15-full)")
    ap.add_argument("--report-only", action="store_true", help=f"re-render the tables of the last run ({RESULTS})")
    args = ap.parse_args(argv)
    part = args.part or ("time" if args.device == "cuda" else "all")
    import_host()  # the report checks runs against the pack's own schedules
    if args.report_only:
        results = json.loads(RESULTS.read_text())
    else:
        command = "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])
        results = {"header": f"Generated {datetime.date.today().isoformat()} by `{command.strip()}` on "
                             f"{machine(args.device)}.", "device": args.device, "rounds": args.rounds}
        if part in ("all", "flops"):
            results["flops"] = run_flops([a.strip() for a in args.archs.split(",") if a.strip()], args.full,
                                         args.workers)
        if part in ("all", "time"):
            from .timing import run_timing

            results["timing"] = run_timing(args.device, args.rounds)
        if part in ("all", "demo-switch"):
            from .demo_switch import run_demo_switch

            results["demo_switch"] = run_demo_switch(args.rounds)
        if part == "attention":  # only when asked: it measures the host, not the pack
            from .attention import run_attention

            results["attention"] = run_attention(args.rounds)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results))
    text = render(results)
    print(text)
    if args.markdown:
        write_markdown(args.markdown, text, args.section)
    return 0


def render(results: dict) -> str:
    from .timing import SETTINGS, summarise

    sections = [results["header"]]
    if "flops" in results:
        sections.append(report.flop_section(results["flops"], STEPS))
    if "timing" in results:
        device = results["device"]
        sections.append(report.timing_section(summarise(results["timing"]), device, SETTINGS[device],
                                              results["rounds"]))
    if "demo_switch" in results:
        from .demo_switch import demo_switch_section

        sections.append(demo_switch_section(results["demo_switch"]))
    if "attention" in results:
        from .attention import attention_section

        sections.append(attention_section(results["attention"]))
    return "\n\n".join(sections)


def write_markdown(path: str, text: str, section: str = "") -> None:
    name = f" {section}" if section else ""
    begin, end = MARKER.format(name, "begin"), MARKER.format(name, "end")
    with open(path) as f:
        doc = f.read()
    if begin not in doc or end not in doc:
        raise SystemExit(f"{path} has no '{begin}' ... '{end}' markers to write between")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(f"{head}{begin}\n{text}\n{end}{tail}")


if __name__ == "__main__":
    sys.exit(main())
