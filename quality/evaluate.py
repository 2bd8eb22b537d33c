"""The quality lab's evaluation: every method through the pack's own nodes on ComfyUI servers, measured by
the world's detectors.

A *job* is one composition (a list of concept names) under one method: one API prompt that samples
``seeds`` images in one batch (image i is the i-th noise of the job's seed, as the host's KSampler makes
a batch), built from the host's nodes, the pack's nodes and the lab's loader
(``quality/comfyui``). Jobs are independent and deterministic, so any server may run any job: with
several servers the jobs are dealt round-robin and run side by side, and the merged results equal one
server's. A job's images come back as the PNGs its SaveImage node wrote (8-bit, as an artist sees them)
and are read by ``quality.detect``.

Methods: ``base`` (the model without LoRAs, same prompt), ``merge``, ``switch``, ``composite``,
``cmlora`` (the frequency schedule from the LoRA Profiler on the composition, categories left to the
profiler), ``clora`` (CLoRA Attention Masker and the stock KSampler; style LoRAs everywhere) and
``regions`` (each character or clothing LoRA masked to the layout's figure zone, an object LoRA to the
object zone, backgrounds and styles unmasked).
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import random
import statistics
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

import torch

from . import detect, lab
from .world import CATEGORIES, CONCEPTS, Scene, caption, concept_category

METHODS = ("base", "merge", "switch", "composite", "cmlora", "clora", "regions")
CHECKPOINT = "cmlora_tiny_sd15.safetensors"  # the generated checkpoint whose CLIP the lab trained with
BASE_FILE = "lab_base.safetensors"


@dataclass(frozen=True)
class Settings:
    """How every job samples (the methods' own settings are the nodes' defaults unless named here)."""

    seeds: int = 20
    seed: int = 1
    steps: int = 20
    cfg: float = 3.0
    sampler: str = "euler"
    scheduler: str = "normal"
    switch_interval: int = 2


@dataclass(frozen=True)
class Job:
    concepts: tuple[str, ...]
    method: str

    @property
    def key(self) -> str:
        return f"{self.method}-{'-'.join(self.concepts)}"


def compositions(per_size: int = 3, sizes=range(2, 6), seed: int = 0) -> list[tuple[str, ...]]:
    """ComposLoRA's way: a character and N - 1 concepts of other categories, one per category; ``per_size``
    compositions of each size N, drawn from ``seed``."""
    rng = random.Random(seed)
    out = []
    others = [c for c in CATEGORIES if c != "character"]
    for n in sizes:
        seen = set()
        while sum(len(c) == n for c in out) < per_size:
            cats = rng.sample(others, n - 1)
            combo = (rng.choice(CONCEPTS["character"]), *(rng.choice(CONCEPTS[c]) for c in cats))
            ordered = tuple(sorted(combo, key=lambda name: CATEGORIES.index(concept_category(name))))
            if ordered not in seen:
                seen.add(ordered)
                out.append(ordered)
    return out


def check_composition(concepts) -> tuple[str, ...]:
    """The composition as a tuple, or ValueError naming what is wrong (unknown concept, two of a category)."""
    if not isinstance(concepts, (list, tuple)) or not concepts or not all(isinstance(c, str) for c in concepts):
        raise ValueError(f"a composition is a non-empty list of concept names, got {concepts!r}")
    Scene.of(concepts)  # raises on an unknown name or two concepts of one category
    return tuple(concepts)


def prompt_text(concepts) -> str:
    return caption(Scene.of(concepts), lab.TRIGGERS)


# ---------------------------------------------------------------- API prompts

def build_prompt(job: Job, settings: Settings) -> dict:
    """The API-format prompt of a job (node ids are strings, links [node id, output index])."""
    p: dict[str, dict] = {}

    def add(node_id: str, class_type: str, **inputs) -> str:
        p[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id

    ckpt = add("ckpt", "CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    model = add("lab", "CMLoRALab_ModelLoader", model_name=BASE_FILE, batch_size=settings.seeds)
    text = prompt_text(job.concepts)
    pos = add("pos", "CLIPTextEncode", text=text, clip=[ckpt, 1])
    neg = add("neg", "CLIPTextEncode", text="", clip=[ckpt, 1])
    sampling = dict(seed=settings.seed, steps=settings.steps, cfg=settings.cfg, sampler_name=settings.sampler,
                    scheduler=settings.scheduler)
    stack = None
    if job.method != "base":
        for i, name in enumerate(job.concepts):
            category = concept_category(name)
            inputs = dict(lora_name=f"lab_{name}.safetensors", strength_model=1.0, strength_clip=1.0, enabled=True,
                          category="auto" if job.method == "cmlora" else category, concept=name, trigger="")
            if stack is not None:
                inputs["stack"] = [stack, 0]
            if job.method == "regions" and category in ("character", "clothing", "object"):
                zone = add(f"zone{i}", "CMLoRALab_ZoneMask", zone="object" if category == "object" else "figure")
                inputs.update(mask=[zone, 0], mask_feather=4)
            stack = add(f"lora{i}", "CMLoRA_LoraStack", **inputs)
    if job.method == "base":
        latent = add("sample", "KSampler", model=[model, 0], positive=[pos, 0], negative=[neg, 0],
                     latent_image=[model, 2], denoise=1.0, **sampling)
        out = [latent, 0]
    elif job.method == "clora":
        # CLoRA puts each LoRA's trigger before its concept's words in that LoRA's prompt: given the plain caption
        plain = caption(Scene.of(job.concepts))
        masker = add("clora", "CLoRA_AttentionMasker", model=[model, 0], clip=[ckpt, 1], stack=[stack, 0], prompt=plain)
        latent = add("sample", "KSampler", model=[masker, 0], positive=[masker, 1], negative=[neg, 0],
                     latent_image=[model, 2], denoise=1.0, **sampling)
        out = [latent, 0]
    else:
        extra = {}
        if job.method == "cmlora":
            one = add("lab1", "CMLoRALab_ModelLoader", model_name=BASE_FILE, batch_size=1)
            profiler = add("profiler", "CMLoRA_Profiler", model=[model, 0], stack=[stack, 0], positive=[pos, 0],
                           negative=[neg, 0], latent_image=[one, 2], vae=[model, 1], **{**sampling, "seed": 0})
            add("save_profile", "CMLoRA_SaveProfile", profile=[profiler, 0], filename=f"lab-{job.key}")
            schedule = add("scheduler", "CMLoRA_FrequencyScheduler", profile=[profiler, 0], mode="offline",
                           switch_interval=settings.switch_interval, preview_steps=settings.steps)
            extra["schedule"] = [schedule, 0]
        latent = add("sample", "CMLoRA_Sampler", model=[model, 0], stack=[stack, 0], method=job.method,
                     switch_interval=settings.switch_interval, positive=[pos, 0], negative=[neg, 0],
                     latent_image=[model, 2], denoise=1.0, **sampling, **extra)
        out = [latent, 0]
    images = add("decode", "VAEDecode", samples=out, vae=[model, 1])
    add("save", "SaveImage", images=[images, 0], filename_prefix=f"lab/{job.key}")
    return p


def compare_prompt(concepts, settings: Settings, methods: str = "base, merge, switch, composite, cmlora",
                   prefix: str = "lab_compare") -> dict:
    """The pack's Compare Methods on the lab model: one seed, one labelled grid of ``methods`` (cmlora
    scheduled from the LoRAs' categories), saved with ``prefix``; the demo's lab picture."""
    p = build_prompt(Job(tuple(concepts), "merge"), dataclasses.replace(settings, seeds=1))
    sampling = {k: p["sample"]["inputs"][k] for k in ("seed", "steps", "cfg", "sampler_name", "scheduler")}
    last = f"lora{len(concepts) - 1}"
    for node_id in ("sample", "decode", "save"):
        del p[node_id]
    p["scheduler"] = {"class_type": "CMLoRA_FrequencyScheduler",
                      "inputs": {"stack": [last, 0], "mode": "offline", "switch_interval": settings.switch_interval,
                                 "preview_steps": settings.steps}}
    p["compare"] = {"class_type": "CMLoRA_CompareMethods",
                    "inputs": {"model": ["lab", 0], "stack": [last, 0], "positive": ["pos", 0],
                               "negative": ["neg", 0], "latent_image": ["lab", 2], "vae": ["lab", 1],
                               "methods": methods, "switch_interval": settings.switch_interval,
                               "schedule": ["scheduler", 0], **sampling}}
    p["save"] = {"class_type": "SaveImage", "inputs": {"images": ["compare", 0], "filename_prefix": prefix}}
    return p


# ---------------------------------------------------------------- running on servers

@dataclass
class Outcome:
    job: Job
    images: list  # (3, 64, 64) tensors in [0, 1], one per seed
    seconds: float  # the server's execution time of the prompt (from its history's timestamps)
    profile: dict | None = None


def _fetch(server, image: dict) -> bytes:
    query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                    "type": image.get("type", "output")})
    with urllib.request.urlopen(f"{server.url}/view?{query}", timeout=60) as r:
        return r.read()


def _png(data: bytes) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).movedim(-1, 0)


def _seconds(entry: dict) -> float:
    stamps = {m[0]: m[1].get("timestamp") for m in entry.get("status", {}).get("messages", [])}
    start, end = stamps.get("execution_start"), stamps.get("execution_success")
    return (end - start) / 1000 if start is not None and end is not None else float("nan")


def with_defaults(prompt: dict, object_info: dict) -> dict:
    """The prompt with every required widget it leaves out set to the node's default (the first option of a
    combo without one), as the graph editor fills a new node."""
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        required = object_info[node["class_type"]]["input"].get("required", {})
        for name, spec in required.items():
            if name in node["inputs"]:
                continue
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if "default" in options:
                node["inputs"][name] = options["default"]
            elif isinstance(spec[0], list) and spec[0]:
                node["inputs"][name] = spec[0][0]
            elif spec[0] == "COMBO" and options.get("options"):
                node["inputs"][name] = options["options"][0]
    return out


def run_job(server, job: Job, settings: Settings, object_info: dict) -> Outcome:
    entry = server.run(with_defaults(build_prompt(job, settings), object_info))
    files = [i for out in entry.get("outputs", {}).values() for i in out.get("images", [])
             if i.get("type", "output") == "output" and i.get("subfolder", "").startswith("lab")]
    images = [_png(_fetch(server, f)) for f in sorted(files, key=lambda f: f["filename"])]
    if len(images) != settings.seeds:
        raise RuntimeError(f"{job.key}: the server returned {len(images)} images, expected {settings.seeds}")
    profile = None
    if job.method == "cmlora":
        query = urllib.parse.urlencode({"filename": f"lab-{job.key}.json", "subfolder": "cmlora_profiles",
                                        "type": "output"})
        with urllib.request.urlopen(f"{server.url}/view?{query}", timeout=60) as r:
            profile = json.loads(r.read())
    return Outcome(job, images, _seconds(entry), profile)


def run_jobs(servers: list, jobs: list[Job], settings: Settings, log=print) -> list[Outcome]:
    """Every job on the servers, dealt round-robin (job i on server i mod n), the servers side by side.
    The outcomes come back in the jobs' order."""
    object_info = servers[0].get("/object_info")
    results: list[Outcome | None] = [None] * len(jobs)
    errors: list[BaseException] = []
    done = [0]
    lock = threading.Lock()

    def work(k: int):
        for i in range(k, len(jobs), len(servers)):
            if errors:
                return
            try:
                results[i] = run_job(servers[k], jobs[i], settings, object_info)
            except BaseException as e:  # reported after the other servers stop
                errors.append(e)
                return
            wanted = {concept_category(n): n for n in jobs[i].concepts}
            whole = sum(all(detect.detect(img)[c] == n for c, n in wanted.items()) for img in results[i].images)
            with lock:
                done[0] += 1
                log(f"quality: {done[0]}/{len(jobs)} {jobs[i].key} ({results[i].seconds:.1f} s): every concept in "
                    f"{whole}/{len(results[i].images)} images")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(servers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]


# ---------------------------------------------------------------- measures

def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (round(centre - half, 4), round(centre + half, 4))


@dataclass
class Tally:
    """Per-concept hits, all-concepts hits and fidelity values of one method at one N."""

    concepts: int = 0
    concept_hits: int = 0
    images: int = 0
    all_hits: int = 0
    fidelity: list = field(default_factory=list)
    seconds: list = field(default_factory=list)

    def add(self, wanted: dict[str, str], found: dict[str, str | None], fidelity: float) -> None:
        hits = sum(found[c] == n for c, n in wanted.items())
        self.concepts += len(wanted)
        self.concept_hits += hits
        self.images += 1
        self.all_hits += hits == len(wanted)
        self.fidelity.append(fidelity)

    def summary(self) -> dict:
        mean = statistics.fmean(self.fidelity) if self.fidelity else float("nan")
        sd = statistics.stdev(self.fidelity) if len(self.fidelity) > 1 else 0.0
        half = 1.96 * sd / math.sqrt(len(self.fidelity)) if self.fidelity else float("nan")
        return {"recall": round(self.concept_hits / self.concepts, 4) if self.concepts else None,
                "recall_ci": wilson(self.concept_hits, self.concepts),
                "all_concepts": round(self.all_hits / self.images, 4) if self.images else None,
                "all_concepts_ci": wilson(self.all_hits, self.images),
                "fidelity": round(mean, 4), "fidelity_ci": (round(mean - half, 4), round(mean + half, 4)),
                "images": self.images,
                "seconds_per_image": round(statistics.median(self.seconds), 3) if self.seconds else None}


def measure(outcomes: list[Outcome]) -> dict:
    """Per method and N: recall, all-concepts rate, fidelity (``detect.confidence``), time per image."""
    tallies: dict[tuple[str, int], Tally] = {}
    for o in outcomes:
        wanted = {concept_category(n): n for n in o.job.concepts}
        tally = tallies.setdefault((o.job.method, len(o.job.concepts)), Tally())
        tally.seconds.append(o.seconds / len(o.images))
        for img in o.images:
            found = detect.detect(img)
            tally.add(wanted, found, detect.confidence(img, wanted))
    out: dict[str, dict] = {}
    for (method, n), tally in sorted(tallies.items(), key=lambda kv: (METHODS.index(kv[0][0]), kv[0][1])):
        out.setdefault(method, {})[str(n)] = tally.summary()
    return out


def profile_split(outcomes: list[Outcome]) -> dict:
    """The profiler's measured H/L set of each concept's LoRA against the world's frequency content (a
    background is low-frequency, every other concept high): per concept, how often it was measured H."""
    counts: dict[str, list[int]] = {}
    for o in outcomes:
        if o.profile is None:
            continue
        for entry in o.profile["loras"]:
            name = entry["name"].removeprefix("lab_").removesuffix(".safetensors")
            counts.setdefault(name, []).append(entry["measured_set"] == "H")
    out = {}
    for name, sets in sorted(counts.items()):
        expected = "L" if concept_category(name) == "background" else "H"
        share_high = sum(sets) / len(sets)
        out[name] = {"expected": expected, "measured_high_share": round(share_high, 3), "profiles": len(sets),
                     "agrees": (share_high if expected == "H" else 1 - share_high) > 0.5}  # a tie does not agree
    return out


def seconds_of(outcomes: list[Outcome]) -> float:
    return sum(o.seconds for o in outcomes)


def now() -> float:
    return time.perf_counter()
