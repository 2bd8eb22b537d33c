"""The LoRA Profiler's work: sample the baseline and each LoRA alone, measure spectra, split H/L."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers

import torch

from ..cmlora_core.cmlora import split_sets
from ..cmlora_core.errors import CMLoRAError
from ..cmlora_core.lora_file import FileCache, file_sha256
from ..cmlora_core.spectrum import grey, high_frequency_score, radial_profile
from . import host
from .checks import shown
from .loras import MappedLora

log = logging.getLogger("cmlora")

PROFILE_VERSION = 2  # 2: the reference's measure (8-bit grey, floored rings out to the corners)
CUTOFF = 0.2
MIN_SIDE = 8  # latent pixels on the short side: fewer leave too few rings for a spectrum
_HASHES = FileCache(budget=64)  # SHA-256 strings, counted
_PROFILES: dict[str, dict] = {}  # cache key -> profile, so a re-run with the same inputs costs nothing


def model_fingerprint(model) -> str:
    """Identity of a base model: its family, layer shapes and two checkpoint tensors."""
    sd = model.model.diffusion_model.state_dict()
    h = hashlib.sha256(host.model_family(model).encode())
    for k in sorted(sd):
        h.update(f"{k}:{tuple(sd[k].shape)};".encode())
    keys = sorted(k for k in sd if k.endswith(".bias"))[:2]
    for t in host.original_weights(model, [f"diffusion_model.{k}" for k in keys]).values():
        h.update(t.detach().float().cpu().numpy().tobytes())
    return f"{host.model_family(model)}:{h.hexdigest()[:16]}"


def _tensor_digest(value) -> str:
    h = hashlib.sha256()

    def walk(v):
        if torch.is_tensor(v):
            h.update(str(tuple(v.shape)).encode())
            h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                h.update(str(k).encode())
                walk(v[k])
        elif isinstance(v, (int, float, str, bool)) or v is None:
            h.update(repr(v).encode())

    walk(value)
    return h.hexdigest()[:16]


def _measure(image_or_latent: torch.Tensor, decoded: bool) -> tuple[list[float], float]:
    profiles = [radial_profile(grey(im, decoded)) for im in image_or_latent]
    mean = torch.stack(profiles).mean(0)
    return mean.tolist(), high_frequency_score(mean, CUTOFF)


def profile_loras(model, mapped: list[MappedLora], positive, negative, latent, seed, steps, cfg, sampler_name,
                  scheduler, vae=None, node: str = "CMLoRA LoRA Profiler") -> dict:
    """Sample the baseline and each LoRA alone (at its strength, over its step range and curve, as
    merge applies it); return the profile (JSON-simple dict)."""
    side = min(latent["samples"].shape[-2:])
    if side < MIN_SIDE:
        raise CMLoRAError(node, "latent_image", f"the latent is {side} pixels on its short side; a spectrum needs at "
                          f"least {MIN_SIDE} ({MIN_SIDE * 8} image pixels).",
                          f"profile at {MIN_SIDE * 8}x{MIN_SIDE * 8} or larger (the size you will sample at is best).")
    settings = {"seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler_name, "scheduler": scheduler,
                "latent_shape": list(latent["samples"].shape), "source": "image" if vae is not None else "latent"}
    loras = [{"name": m.entry.name, "sha256": _HASHES.get(m.entry.path, file_sha256),
              "strength_model": m.entry.strength_model, "category": m.entry.category} for m in mapped]
    base = model_fingerprint(model)
    ranges = [[m.entry.start, m.entry.end, m.entry.curve, m.entry.strength_end] for m in mapped]
    key = hashlib.sha256(json.dumps([PROFILE_VERSION, base, settings, loras, ranges, _tensor_digest(positive),
                                     _tensor_digest(negative), _tensor_digest(latent["samples"])]).encode()).hexdigest()
    if key in _PROFILES:
        log.info("CMLoRA profiler: same inputs as before, reusing the profile")
        return _PROFILES[key]

    from .methods import merge  # each LoRA alone as merge applies it: its step range and curve too

    runs = [("baseline", model)]
    for m in mapped:
        clone = model.clone()
        if m.entry.scheduled:
            merge(clone, [m], node)
        else:  # the host's own patches; the score check below names the LoRA
            clone.add_patches(m.patches, m.entry.strength_model)
        runs.append((m.entry.name, clone))
    bar = host.ProgressBar(len(runs) * steps)
    results = []
    for name, m in runs:
        curve: list[float] = []

        def callback(step, x0, x, total, curve=curve):
            host.throw_if_interrupted()
            curve.append(sum(high_frequency_score(radial_profile(grey(im, False)), CUTOFF) for im in x0.float().cpu()) / x0.shape[0])
            bar.update(1)

        samples = host.sample_latent(m, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, callback)
        final = vae.decode(samples).movedim(-1, 1) if vae is not None else samples
        spectrum, score = _measure(final.detach().float().cpu(), decoded=vae is not None)
        if not (math.isfinite(score) and all(map(math.isfinite, spectrum))):
            who = "the base model alone" if m is model else f"LoRA '{name}' alone"
            raise CMLoRAError(node, "model" if m is model else "stack",
                              f"sampling {who} gave NaN or infinite values, so it has no spectrum to score.",
                              "lower cfg or the LoRA's strength_model; if the base model alone fails, try another "
                              "sampler or run the model in fp32 (--force-fp32).")
        results.append({"name": name, "score": score, "profile": spectrum, "curve": curve})
        log.info("CMLoRA profiler: %s high-frequency score %.4f", name, score)

    baseline, per_lora = results[0], results[1:]
    high, low = split_sets([r["score"] for r in per_lora], baseline["score"], [lo["category"] for lo in loras])
    for i, (info, r) in enumerate(zip(loras, per_lora)):
        info.update(r)
        info["set"] = "H" if i in high else "L"
        info["measured_set"] = "H" if r["score"] > baseline["score"] else "L"
    profile = {"version": PROFILE_VERSION, "base_model": base, "settings": settings, "cutoff": CUTOFF,
               "source": settings["source"], "baseline": baseline, "loras": loras,
               "high": [loras[i]["name"] for i in high], "low": [loras[i]["name"] for i in low],
               "order": [loras[i]["name"] for i in high + low], "cache_key": key}
    _PROFILES[key] = profile
    return profile


def check_profile(profile, node: str, input: str = "profile") -> dict:
    """A profile rebuilt from its checked fields, or the pack's error when it is not one this version reads.

    Profiles arrive from files and API prompts, so every field a node reads is checked for its
    type, and nothing else is carried over (no unknown keys, no deep nesting)."""
    def bad(what: str):
        raise CMLoRAError(node, input, f"this is not a CMLoRA profile this version can read ({what}).",
                          "re-run the CMLoRA LoRA Profiler, or load a file written by CMLoRA Save Profile.")

    def text(v, where):
        return v if isinstance(v, str) and len(v) <= 1024 else bad(f"{where} is not a name")

    def number(v, where):
        ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
        return float(v) if ok else bad(f"{where} is not a finite number")

    def series(v, where):
        if not isinstance(v, list) or len(v) > 100_000:
            bad(f"{where} is not a list of numbers")
        return [number(x, where) for x in v]

    def run(e, where):
        if not isinstance(e, dict):
            bad(f"{where} is not a record")
        return {"name": text(e.get("name"), f"{where} name"), "score": number(e.get("score"), f"{where} score"),
                "profile": series(e.get("profile"), f"{where} spectrum"), "curve": series(e.get("curve", []), f"{where} curve")}

    if not isinstance(profile, dict):
        bad(f"a {type(profile).__name__}")
    if profile.get("version") != PROFILE_VERSION:
        bad(f"version {shown(profile.get('version'), 20)}, expected {PROFILE_VERSION}")
    loras = profile.get("loras")
    if not isinstance(loras, list) or not loras or len(loras) > 1000:
        bad("no list of LoRAs")
    out_loras = []
    for i, e in enumerate(loras):
        r = run(e, f"LoRA {i + 1}")
        r["set"] = e.get("set") if e.get("set") in ("H", "L") else bad(f"LoRA {i + 1} set is not H or L")
        measured = e.get("measured_set")
        r["measured_set"] = measured if measured in ("H", "L") else r["set"]
        r["sha256"] = text(e.get("sha256", ""), f"LoRA {i + 1} sha256")
        r["strength_model"] = number(e.get("strength_model", 1.0), f"LoRA {i + 1} strength_model")
        r["category"] = text(e.get("category", "auto"), f"LoRA {i + 1} category")
        out_loras.append(r)
    names = [r["name"] for r in out_loras]
    if len(set(names)) != len(names):
        bad("a LoRA is listed twice")
    sets = {}
    for key in ("high", "low"):
        value = profile.get(key)
        if not isinstance(value, list) or not all(isinstance(n, str) and n in names for n in value):
            bad(f"'{key}' does not list the profile's LoRAs")
        sets[key] = list(value)
    if sorted(sets["high"] + sets["low"]) != sorted(names):
        bad("'high' and 'low' do not split the LoRAs")
    settings = profile.get("settings", {})
    if not isinstance(settings, dict):
        bad("settings are not a record")
    return {"version": PROFILE_VERSION, "base_model": text(profile.get("base_model", ""), "base_model"),
            "settings": {k: v for k, v in settings.items() if isinstance(k, str) and len(k) < 64
                         and (isinstance(v, (str, int, float, bool)) or (isinstance(v, list) and len(v) <= 8
                              and all(isinstance(x, int) for x in v)))},
            "cutoff": number(profile.get("cutoff", CUTOFF), "cutoff"),
            "source": "image" if profile.get("source") == "image" else "latent",
            "baseline": run(profile.get("baseline"), "baseline"), "loras": out_loras,
            "high": sets["high"], "low": sets["low"], "order": sets["high"] + sets["low"],
            "cache_key": text(profile.get("cache_key", ""), "cache_key")}
