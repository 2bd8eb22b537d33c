"""The LoRA Profiler's work: sample the baseline and each LoRA alone, measure spectra, split H/L."""
from __future__ import annotations

import hashlib
import json
import logging

import torch

from ..cmlora_core.cmlora import split_sets
from ..cmlora_core.errors import CMLoRAError
from ..cmlora_core.lora_file import FileCache, file_sha256
from ..cmlora_core.spectrum import high_frequency_score, radial_profile
from . import host
from .loras import MappedLora

log = logging.getLogger("cmlora")

PROFILE_VERSION = 1
CUTOFF = 0.2
_HASHES = FileCache(capacity=64)
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


def _measure(image_or_latent: torch.Tensor) -> tuple[list[float], float]:
    profiles = [radial_profile(im) for im in image_or_latent]
    mean = torch.stack(profiles).mean(0)
    return mean.tolist(), high_frequency_score(mean, CUTOFF)


def profile_loras(model, mapped: list[MappedLora], positive, negative, latent, seed, steps, cfg, sampler_name,
                  scheduler, vae=None, node: str = "CMLoRA LoRA Profiler") -> dict:
    """Sample the baseline and each LoRA alone; return the profile (JSON-simple dict)."""
    settings = {"seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler_name, "scheduler": scheduler,
                "latent_shape": list(latent["samples"].shape), "source": "image" if vae is not None else "latent"}
    loras = [{"name": m.entry.name, "sha256": _HASHES.get(m.entry.path, file_sha256),
              "strength_model": m.entry.strength_model, "category": m.entry.category} for m in mapped]
    base = model_fingerprint(model)
    key = hashlib.sha256(json.dumps([PROFILE_VERSION, base, settings, loras, _tensor_digest(positive),
                                     _tensor_digest(negative), _tensor_digest(latent["samples"])]).encode()).hexdigest()
    if key in _PROFILES:
        log.info("CMLoRA profiler: same inputs as before, reusing the profile")
        return _PROFILES[key]

    runs = [("baseline", model)]
    for m in mapped:
        clone = model.clone()
        clone.add_patches(m.patches, m.entry.strength_model)
        runs.append((m.entry.name, clone))
    bar = host.ProgressBar(len(runs) * steps)
    results = []
    for name, m in runs:
        curve: list[float] = []

        def callback(step, x0, x, total, curve=curve):
            host.throw_if_interrupted()
            curve.append(sum(high_frequency_score(radial_profile(im), CUTOFF) for im in x0.float().cpu()) / x0.shape[0])
            bar.update(1)

        samples = host.sample_latent(m, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, callback)
        final = vae.decode(samples).movedim(-1, 1) if vae is not None else samples
        spectrum, score = _measure(final.detach().float().cpu())
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


def check_profile(profile: dict, node: str, input: str = "profile") -> dict:
    """A clear error for something that is not a profile this version can read."""
    if not isinstance(profile, dict) or profile.get("version") != PROFILE_VERSION or "loras" not in profile:
        raise CMLoRAError(node, input, "this is not a CMLoRA profile (or one from an incompatible version).",
                          "re-run the CMLoRA LoRA Profiler.")
    return profile
