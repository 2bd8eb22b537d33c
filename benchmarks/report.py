"""The benchmark's tables and target checks, as Markdown."""
from __future__ import annotations

from .flops import check_passes, cmlora_bound, observed_passes
from .harness import ARCHS, Case

NS = range(1, 6)


def _ratio(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _labels(cases) -> list[str]:
    """Row labels in reading order: merge, switch, composite, cmlora variants, clora."""
    ordered = sorted(cases, key=lambda c: (_ORDER.get(c.method, 9), c.mode != "offline", c.mode,
                                           c.cache != "deep", c.cache, not c.dominant_full, not c.updates))
    seen: list[str] = []
    for c in ordered:
        if c.label not in seen:
            seen.append(c.label)
    return seen


def flop_section(flops: dict, steps: int) -> str:
    parts = []
    for arch, data in flops.items():
        parts.append(_flop_arch(arch, data["costs"], data["runs"], steps))
    return "\n\n".join(parts)


def _flop_arch(arch: str, costs: dict, run_list: list, steps: int) -> str:
    runs = {Case(**r["case"]): r for r in run_list}
    a = ARCHS[arch]
    steps = a.steps or steps
    by = {(c.label, c.n): (c, r) for c, r in runs.items()}
    merge = {n: by[("merge", n)][1]["flops"] for n in NS if ("merge", n) in by}
    if a.unet:
        f_unet = costs["shallow_unet"] / costs["full_unet"]
        f_lora = costs["shallow_lora"] / costs["full_lora"]
        title = f"{steps} steps, CFG (cond and uncond in one call)"
        costs_line = (f"One UNet call on the CFG pair: {costs['full_unet'] / 1e12:.3f} TFLOP; with one rank-32 LoRA "
                      f"routed: {costs['full_lora'] / 1e12:.3f}. CMLoRA's shallow pass: f = {f_unet:.3f} of a call "
                      f"({f_lora:.3f} with the LoRA routed).")
    else:
        title = f"{steps} steps, guidance {a.guidance} in the model, CFG 1 (one row per call), {a.tokens} T5 tokens"
        costs_line = (f"One call of the transformer: {costs['full_unet'] / 1e12:.3f} TFLOP; with one rank-32 LoRA "
                      f"routed: {costs['full_lora'] / 1e12:.3f}.")
    lines = [f"### FLOPs per image: {a.name}, {a.size}x{a.size}, {title}",
             "",
             costs_line,
             "",
             "Ratio to merge with the same N (merge's row: TFLOP per image).",
             "",
             "| method | " + " | ".join(f"N={n}" for n in NS) + " |",
             "|---|" + "---:|" * len(NS)]
    for label in _labels(runs):
        cells = []
        for n in NS:
            hit = by.get((label, n))
            if hit is None:
                cells.append("–")
            elif label == "merge":
                cells.append(f"{hit[1]['flops'] / 1e12:.2f}")
            else:
                cells.append(_ratio(hit[1]["flops"] / merge[n]))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    # passes: the runs against what the schedules prescribe
    problems = []
    for c, r in runs.items():
        problems += [f"{c.label} N={c.n}: {p}" for p in check_passes(c, r["trace"], steps, a.rows)]
    lines += ["", "Passes per run at N=5 (CLoRA at N=2), read from the runtime's trace:", "",
              "| method | model calls | rows per forward | full LoRA passes | shallow | reused | loss passes | refolds |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label in _labels(runs):
        n = 2 if label.startswith("clora") else 5
        hit = by.get((label, n))
        if hit is None:
            continue
        c, r = hit
        seen = observed_passes(r["trace"])
        if c.method in ("composite", "composite-seq"):
            full = seen["lora_rows"] // a.rows  # rows of one call's image per LoRA evaluation
        else:
            full = seen.get("full", "–")
        kind = c.method
        lines.append(f"| {label} | {seen['model_calls']} | {seen['rows_per_call']} | "
                     f"{full if kind in ('composite', 'composite-seq', 'cmlora') else '–'} | "
                     f"{seen['shallow'] if kind == 'cmlora' else '–'} | {seen['reused'] if kind == 'cmlora' else '–'} | "
                     f"{seen.get('loss_passes', '–')} | {seen['folds'] if kind == 'switch' else '–'} |")
    lines += ["", ("Every run's passes agree with its schedule (model calls, rows, switch's active LoRA per step "
                   "and refolds, composite's LoRA rows, CMLoRA's full/shallow/reused passes, CLoRA's loss passes)."
                   if not problems else "Runs that differ from their schedule:\n" + "\n".join(f"- {p}" for p in problems))]
    lines += ["", "Targets:", ""] + _flop_targets(runs, by, merge, costs, steps)
    return "\n".join(lines)


def _flop_targets(runs, by, merge, costs, steps) -> list[str]:
    out = []
    switch = [by[("switch", n)][1]["flops"] / merge[n] for n in NS if ("switch", n) in by]
    if switch:
        worst = max(switch)
        out.append(f"- switch vs merge: at most {100 * (worst - 1):+.2f}% FLOPs (target +2%): "
                   f"{'met' if worst <= 1.02 else 'NOT met'}.")
    composite = [(by[("composite", n)][1]["flops"] / (n * merge[n]), n) for n in NS if ("composite", n) in by]
    if composite:
        worst, wn = max(composite, key=lambda c: abs(c[0] - 1))
        out.append(f"- composite vs N x merge: within {100 * abs(worst - 1):.2f}% (worst at N={wn}; target 3%): "
                   f"{'met' if abs(worst - 1) <= 0.03 else 'NOT met'}.")
    bounds = []
    for c, r in runs.items():
        if c.method == "cmlora":
            bounds.append((r["flops"] / cmlora_bound(c, r["trace"], costs, steps), c))
    if bounds:
        worst, wc = max(bounds, key=lambda b: abs(b[0] - 1))
        out.append(f"- cmlora vs its structural bound (schedule's full passes x full + shallow passes x shallow): "
                   f"within {100 * abs(worst - 1):.2f}% over {len(bounds)} runs (worst: {wc.label} N={wc.n}; "
                   f"target 3%): {'met' if abs(worst - 1) <= 0.03 else 'NOT met'}.")
        c5 = by.get(("cmlora offline/deep", 5))
        comp5 = by.get(("composite", 5))
        if c5 and comp5:
            out.append(f"- cmlora offline/deep at N=5 costs {c5[1]['flops'] / comp5[1]['flops']:.3f} of composite "
                       f"({c5[1]['flops'] / merge[5]:.2f}x merge).")
    clora = by.get(("clora", 2))
    if clora:
        x = clora[1]["flops"] / merge[2]
        line = f"- clora, two LoRAs, default schedule: {x:.2f}x merge (target: below the paper's 7.5x): " \
               f"{'met' if x < 7.5 else 'NOT met'}"
        plain = by.get(("clora, no latent updates", 2))
        if plain:
            share = 1 - plain[1]["flops"] / clora[1]["flops"]
            line += (f"; the latent updates ({clora[1]['trace'].get('loss_passes')} loss passes) are "
                     f"{100 * share:.0f}% of it, the three-branch forwards the rest")
        out.append(line + ".")
    return out


def timing_section(rows: list[dict], device: str, settings: dict, rounds: int) -> str:
    a = ARCHS[settings["arch"]]
    by = {(r["case"].label, r["case"].n): r for r in rows}
    what = ("the small UNet (SD1.5 layout, three levels, width 128), fp32, CPU" if device == "cpu"
            else f"the full-size {a.name} UNet, {settings['dtype']}, CUDA")
    lines = [(f"### Wall time and peak memory: {what}, {a.size}x{a.size}, "
              f"{settings['steps']} steps, euler, CFG 5, rank-32 LoRAs, median of {rounds} alternating rounds"),
             "",
             "| method | N | seconds (min–max) | time vs merge | peak MiB | memory vs merge |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: case_key(r["case"])):
        c = r["case"]
        lines.append(f"| {c.label} | {c.n} | {r['seconds']:.2f} ({r['min']:.2f}–{r['max']:.2f}) | "
                     f"{_ratio(r['time_ratio'], 2)} | {r['peak'] / 2**20:.0f} | {_ratio(r['peak_ratio'], 2)} |")
    gpu = device == "cuda"
    lines += ["", "Batching (composite as one forward vs N sequential forwards of the same routed model):", ""]
    ratios = []
    for n in NS:
        b, s = by.get(("composite", n)), by.get(("composite, N sequential", n))
        if b and s:
            ratios.append(b["seconds"] / s["seconds"])
            lines.append(f"- N={n}: batched {b['seconds']:.2f} s, sequential {s['seconds']:.2f} s "
                         f"-> batched takes {ratios[-1]:.2f} of the time")
    lines += ["", "Targets:", ""]
    if ratios:
        ok = max(ratios) < 1.0 if gpu else max(ratios) <= 1.0
        lines.append(f"- composite batched vs N sequential forwards: at most {max(ratios):.2f} of the time "
                     f"(target: {'faster' if gpu else 'not slower'} on {'a GPU' if gpu else 'the CPU'}): "
                     f"{'met' if ok else 'NOT met'}.")
    switch = [by[("switch", n)]["time_ratio"] for n in NS if ("switch", n) in by]
    if switch:
        line = f"- switch vs merge: {min(switch):.2f}–{max(switch):.2f} of merge's time over N=1..5"
        line += (f" (target on a GPU: at most 1.05): {'met' if max(switch) <= 1.05 else 'NOT met'}." if gpu
                 else " (the GPU target of 1.05 is checked with --device cuda).")
        lines.append(line)
    clora = by.get(("clora", 2))
    if clora and clora["time_ratio"] is not None:
        line = f"- clora with two LoRAs: {clora['time_ratio']:.2f}x merge's time"
        line += (f" (target on a GPU: below 7.5x): {'met' if clora['time_ratio'] < 7.5 else 'NOT met'}." if gpu
                 else f" at {settings['steps']} steps (the GPU target is checked with --device cuda at 30 steps).")
        lines.append(line)
    return "\n".join(lines)


_ORDER = {"merge": 0, "switch": 1, "composite": 2, "composite-seq": 3, "cmlora": 4, "clora": 5}


def case_key(c: Case) -> tuple:
    return (c.n, _ORDER.get(c.method, 9), c.label)
