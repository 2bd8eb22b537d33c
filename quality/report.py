"""The lab's evaluation plan and its report: the validation first, then every method at every N.

``evaluate_all`` runs the validation jobs (each concept's LoRA alone with merge, and the base model with
the same prompt) and the comparison (every method on every composition) in one sharded batch, and
returns what ``results.json`` holds; ``write`` turns that into QUALITY.md and a plot of recall against N.
Nothing in the results depends on which server ran a job except the times.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import detect, evaluate
from .evaluate import METHODS, Job, Settings

LORA_ALONE_MIN, BASE_ALONE_MAX, DETECTOR_MIN = 0.9, 0.1, 0.95


def evaluate_all(servers, compositions: list[tuple[str, ...]], settings: Settings, log=print) -> dict:
    concepts = sorted({c for combo in compositions for c in combo})
    checks = [Job((c,), "merge") for c in concepts] + [Job((c,), "base") for c in concepts]
    comparison = [Job(combo, m) for combo in compositions for m in METHODS]
    outcomes = evaluate.run_jobs(servers, checks + comparison, settings, log=log)
    alone, compared = outcomes[:len(checks)], outcomes[len(checks):]

    def share(outcome) -> float:
        (name,) = outcome.job.concepts
        category = evaluate.concept_category(name)
        return round(sum(detect.detect(img)[category] == name for img in outcome.images) / len(outcome.images), 4)

    lora_alone = {o.job.concepts[0]: share(o) for o in alone if o.job.method == "merge"}
    base_alone = {o.job.concepts[0]: share(o) for o in alone if o.job.method == "base"}
    detectors = {k: round(v, 4) for k, v in detect.validate().items()}
    methods = evaluate.measure(compared)
    merge = methods.get("merge", {})
    sizes = sorted(int(n) for n in merge)
    validation = {
        "detectors_on_held_out_renders": detectors,
        "lora_alone_shows_its_concept": lora_alone,
        "base_alone_shows_the_concept": base_alone,
        "merge_recall_by_n": {n: merge[n]["recall"] for n in map(str, sizes)},
        "holds": {
            "detectors": all(v >= DETECTOR_MIN for v in detectors.values()),
            "each_lora_alone": all(v >= LORA_ALONE_MIN for v in lora_alone.values()),
            "base_alone": all(v <= BASE_ALONE_MAX for v in base_alone.values()),
            "merge_loses_concepts": (len(sizes) > 1 and merge[str(sizes[-1])]["recall"] < merge[str(sizes[0])]["recall"]),
        },
    }
    return {"settings": settings.__dict__, "compositions": [list(c) for c in compositions],
            "validation": validation, "methods": methods, "profile_split": evaluate.profile_split(compared),
            "per_composition": per_composition(compared)}


def per_composition(outcomes) -> list[dict]:
    """Each job's concepts found per image (the raw readings behind every figure)."""
    rows = []
    for o in outcomes:
        wanted = {evaluate.concept_category(n): n for n in o.job.concepts}
        found = [sum(detect.detect(img)[c] == n for c, n in wanted.items()) for img in o.images]
        rows.append({"method": o.job.method, "concepts": list(o.job.concepts), "found_per_image": found})
    return rows


def comparable(results: dict) -> dict:
    """The results without what depends on the machine (times), for comparing two runs."""
    out = json.loads(json.dumps(results))
    out.pop("figures", None)
    for by_n in out.get("methods", {}).values():
        for row in by_n.values():
            row.pop("seconds_per_image", None)
    return out


# ---------------------------------------------------------------- writing

def _ci(row: dict, key: str) -> str:
    lo, hi = row[f"{key}_ci"]
    return f"{row[key]:.2f} [{lo:.2f}, {hi:.2f}]"


def write(out: Path, results: dict) -> list[Path]:
    json_path = out / "results.json"
    json_path.write_text(json.dumps(results, indent=1))
    plot_path = out / "recall.png"
    plot(results["methods"], plot_path)
    md = out / "QUALITY.md"
    md.write_text(markdown(results))
    return [md, json_path, plot_path]


def markdown(r: dict) -> str:
    v, s, fig = r["validation"], r["settings"], r.get("figures", {})
    holds = v["holds"]
    mark = {True: "holds", False: "**does not hold**"}
    training = fig.get("training", {})
    lines = ["# Quality lab: what each method does to a composition", "",
             "Measured on the lab's synthetic world (a model and LoRAs trained here from a seed; see the README's "
             "\"Quality lab\"): evidence about these methods on this world, not about real checkpoints.", "",
             f"Settings: {s['seeds']} images per composition and method (the noises of seed {s['seed']}), "
             f"{s['steps']} steps of {s['sampler']}/{s['scheduler']}, cfg {s['cfg']}, switch every "
             f"{s['switch_interval']} steps; {len(r['compositions'])} compositions.", "",
             f"Time: training {training.get('base_minutes', '?')} min (base) + {training.get('lora_minutes', '?')} min "
             f"(LoRAs), evaluation {fig.get('evaluation_minutes', '?')} min.", "",
             "## 1. The lab validates itself", "",
             "| check | figure | |", "|---|---|---|",
             f"| detectors on 500 held-out clean renders (each category, >= {DETECTOR_MIN:.0%}) | "
             + ", ".join(f"{k} {x:.1%}" for k, x in v["detectors_on_held_out_renders"].items())
             + f" | {mark[holds['detectors']]} |",
             f"| each LoRA alone shows its concept (>= {LORA_ALONE_MIN:.0%} of images) | min "
             f"{min(v['lora_alone_shows_its_concept'].values()):.0%} | {mark[holds['each_lora_alone']]} |",
             f"| the base model with the same prompt (<= {BASE_ALONE_MAX:.0%}) | max "
             f"{max(v['base_alone_shows_the_concept'].values()):.0%} | {mark[holds['base_alone']]} |",
             "| merge keeps fewer concepts at the largest N than at the smallest | "
             + ", ".join(f"N={n}: {x:.2f}" for n, x in v["merge_recall_by_n"].items())
             + f" | {mark[holds['merge_loses_concepts']]} |", "",
             "Per concept (share of images showing it): LoRA alone / base alone", "",
             "| concept | LoRA alone | base alone |", "|---|---|---|"]
    for name, x in v["lora_alone_shows_its_concept"].items():
        lines.append(f"| {name} | {x:.0%} | {v['base_alone_shows_the_concept'][name]:.0%} |")
    lines += ["", "## 2. Methods compared", "",
              "Recall: the share of the composition's concepts the detectors find; all: the share of images "
              "showing every one; fidelity: how clearly they show them (0..1, the detectors' margins); "
              "95% intervals in brackets (Wilson for shares, normal for fidelity). Time: the server's seconds "
              "per image on this machine's CPU.", "",
              "| method | N | recall | all concepts | fidelity | s/image |", "|---|---|---|---|---|---|"]
    for method, by_n in r["methods"].items():
        for n, row in by_n.items():
            lines.append(f"| {method} | {n} | {_ci(row, 'recall')} | {_ci(row, 'all_concepts')} | "
                         f"{_ci(row, 'fidelity')} | {row['seconds_per_image']} |")
    lines += ["", "![recall against N](recall.png)", "", "## 3. The profiler's H/L split against the world", "",
              "Backgrounds are low-frequency fields, every other concept has edges or textures; the profiler "
              "measures each LoRA's share of high frequencies against the base model's.", "",
              "| LoRA | expected | measured H in | agrees |", "|---|---|---|---|"]
    for name, row in r["profile_split"].items():
        lines.append(f"| {name} | {row['expected']} | {row['measured_high_share']:.0%} of {row['profiles']} profiles | "
                     f"{'yes' if row['agrees'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def plot(methods: dict, path: Path) -> None:
    """Recall against N, a line per method (Pillow; no plotting library needed)."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=18)
    except TypeError:
        font = ImageFont.load_default()
    width, height, left, top, right, bottom = 760, 440, 70, 30, 560, 390
    img = Image.new("RGB", (width, height), (250, 250, 250))
    d = ImageDraw.Draw(img)
    d.rectangle((left, top, right, bottom), outline=(150, 150, 150), width=2)
    sizes = sorted({int(n) for by_n in methods.values() for n in by_n})
    if not sizes:
        img.save(path)
        return
    span = max(1, sizes[-1] - sizes[0])

    def xy(n, recall):
        return (left + (right - left) * (n - sizes[0]) / span, bottom - (bottom - top) * recall)

    for frac in (0.0, 0.5, 1.0):
        d.text((left - 45, bottom - (bottom - top) * frac - 9), f"{frac:.1f}", fill=(90, 90, 90), font=font)
    for n in sizes:
        d.text((xy(n, 0)[0] - 5, bottom + 8), str(n), fill=(90, 90, 90), font=font)
    d.text((left, 4), "recall of the composed concepts against N", fill=(20, 20, 20), font=font)
    colours = [(120, 120, 120), (230, 85, 60), (60, 130, 220), (90, 180, 90), (200, 160, 40), (160, 90, 200),
               (40, 170, 170)]
    for i, (method, by_n) in enumerate(methods.items()):
        pts = [xy(int(n), row["recall"]) for n, row in sorted(by_n.items(), key=lambda kv: int(kv[0]))]
        colour = colours[i % len(colours)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=3)
        for x, y in pts:
            d.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colour)
        d.line((right + 20, top + 10 + 28 * i, right + 50, top + 10 + 28 * i), fill=colour, width=3)
        d.text((right + 58, top + 28 * i), method, fill=(20, 20, 20), font=font)
    img.save(path)
