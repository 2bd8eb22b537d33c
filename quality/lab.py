"""The quality lab's models: the base model and one LoRA per concept, trained once from a seed and cached.

The base model learns the world without its concepts: a plain ellipse in a grey body on a beige field,
placed and sized at random, captioned "a figure" (and the empty prompt for a tenth of the samples). A
concept's LoRA learns that concept alone on the same scenes, captioned with its trigger word and the
concept's words; so with a composition's prompt the base model draws none of the concepts, and each
LoRA adds its own. Everything is a function of the recipe and its seed; the files are kept under a
folder named by a digest of both, so a second run trains nothing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import train
from .world import CATEGORIES, CONCEPTS, Scene

LAB_VERSION = 1  # bump when the world, the model or the training changes what a recipe trains
CONCEPT_NAMES = tuple(name for category in CATEGORIES for name in CONCEPTS[category])
# a trigger word per concept, as a LoRA's metadata gives it: a made-up word the base model never read
TRIGGERS = {name: f"lab{name[:3]}x" for name in CONCEPT_NAMES}


@dataclass(frozen=True)
class Recipe:
    """How the lab trains (steps of ``batch`` renders; the learning rate decays to a tenth over a run)."""

    base_steps: int = 2400  # a first guess within the 45-minute budget: 1200 steps drew figures as blobs
    lora_steps: int = 200
    batch: int = 32
    lora_batch: int = 16
    base_lr: float = 1e-3
    lora_lr: float = 2e-3
    rank: int = 4
    ema: float = 0.995
    seed: int = 0

    def digest(self) -> str:
        """Names the whole recipe's files (the LoRAs depend on the base, so on every field)."""
        return _digest(dataclasses.asdict(self))

    def base_digest(self) -> str:
        """Names the base model's file: only the fields its training reads, so a LoRA recipe change
        retrains the LoRAs alone."""
        return _digest({k: getattr(self, k) for k in BASE_FIELDS})


BASE_FIELDS = ("base_steps", "batch", "base_lr", "ema", "seed")


def _digest(fields: dict) -> str:
    text = json.dumps({"lab": LAB_VERSION, **fields}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


SMOKE = Recipe(base_steps=3, lora_steps=2, batch=4, lora_batch=4)


def base_scene(rng: random.Random) -> Scene:
    return Scene(seed=rng.randrange(2**31))


def concept_scene(name: str) -> Callable[[random.Random], Scene]:
    return lambda rng: Scene.of([name], seed=rng.randrange(2**31))


@dataclass
class LabFiles:
    """Where a recipe's models are kept: ``<cache>/<digest>/`` holds its LoRAs and training report, the base
    model is ``<cache>/base-<base digest>/lab_base.safetensors`` (shared by recipes that differ in LoRAs only)."""

    cache: Path
    recipe: Recipe

    @property
    def folder(self) -> Path:
        return self.cache / self.recipe.digest()

    @property
    def base(self) -> Path:
        return self.cache / f"base-{self.recipe.base_digest()}" / "lab_base.safetensors"

    def lora(self, name: str) -> Path:
        return self.folder / "loras" / f"lab_{name}.safetensors"

    @property
    def report(self) -> Path:
        return self.folder / "training.json"

    def complete(self) -> bool:
        return self.report.is_file() and self.base.is_file() and all(self.lora(n).is_file() for n in CONCEPT_NAMES)


def server_paths(path: Path, base_folder: Path, lora_folder: Path, checkpoints: Path | None = None) -> Path:
    """Write an extra-model-paths file (ComfyUI's ``--extra-model-paths-config``) that gives a server the lab's
    nodes (``quality/comfyui``), its base model folder, its LoRA folder and, if given, a checkpoints folder."""
    lines = ["cmlora_quality_lab:", f"  custom_nodes: {Path(__file__).resolve().parent / 'comfyui'}"]
    if checkpoints is not None:
        lines.append(f"  checkpoints: {checkpoints}")
    lines += [f"  lab_models: {base_folder}", f"  loras: {lora_folder}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def load_base(path: Path):
    """The lab's base model (the host's BaseModel, float32) with the weights of a file ``train_lab`` wrote."""
    from safetensors.torch import load_file

    model = train.lab_model(seed=0)
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    model.diffusion_model.load_state_dict(state)
    return model


def train_lab(recipe: Recipe, clip, cache: Path, log: Callable[[str], None] = print) -> LabFiles:
    """The base model and every concept's LoRA of ``recipe``, trained with ``clip``'s text encoder unless
    ``cache`` already holds them. Returns where the files are; ``training.json`` there holds the losses
    and the minutes each part took."""
    files = LabFiles(cache, recipe)
    if files.complete():
        log(f"lab: trained models found in {files.folder}")
        return files
    files.lora(CONCEPT_NAMES[0]).parent.mkdir(parents=True, exist_ok=True)
    files.base.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    captions = train.Captions(clip)
    base_report = files.base.parent / "training.json"
    if files.base.is_file() and base_report.is_file():
        log(f"lab: base model found in {files.base.parent}")
        model = load_base(files.base)
        trained_base = json.loads(base_report.read_text())
    else:
        model = train.lab_model(seed=recipe.seed)
        trained_base = _train_base(model, recipe, captions, files.base, _every(log))
        base_report.write_text(json.dumps(trained_base, indent=2))
    lora_started = time.perf_counter()

    lora_losses = {}
    for i, name in enumerate(CONCEPT_NAMES):
        adapters = train.LoraAdapters(model, rank=recipe.rank, seed=recipe.seed + 1 + i)
        sample = train.concept_sampler(concept_scene(name), {name: TRIGGERS[name]})
        lora_losses[name] = train.train(model, adapters.parameters(), sample, captions, steps=recipe.lora_steps,
                                        batch=recipe.lora_batch, lr=recipe.lora_lr, seed=recipe.seed + 1 + i,
                                        log=_every(log)(f"LoRA '{name}'", recipe.lora_steps))
        adapters.save_kohya(files.lora(name), trigger=TRIGGERS[name], concept=name)
        adapters.remove()
    report = {"recipe": dataclasses.asdict(recipe), "lab_version": LAB_VERSION,
              "base_minutes": trained_base["minutes"], "base_loss_last_100": trained_base["loss_last_100"],
              "lora_minutes": round((time.perf_counter() - lora_started) / 60, 2),
              "lora_loss_last_50": {n: sum(v[-50:]) / len(v[-50:]) for n, v in lora_losses.items()}}
    files.report.write_text(json.dumps(report, indent=2))
    log(f"lab: trained in {report['base_minutes'] + report['lora_minutes']:.1f} min -> {files.folder}")
    return files


def _every(log: Callable[[str], None]):
    """A training log that reports every 100th step and the last."""
    def every(what: str, total: int):
        return lambda step, loss: log(f"lab: {what} step {step + 1}/{total}, loss {loss:.4f}") \
            if (step + 1) % 100 == 0 or step + 1 == total else None
    return every


def _train_base(model, recipe: Recipe, captions, path: Path, every) -> dict:
    """Train ``model`` as the recipe's base, write it to ``path`` (fp16, as a downloaded checkpoint) and load
    those fp16 weights back, so the LoRAs learn on the base as the file holds it. Returns the base's report."""
    from safetensors.torch import save_file

    started = time.perf_counter()
    losses = train.train(model, model.diffusion_model.parameters(), train.concept_sampler(base_scene, {}),
                         captions, steps=recipe.base_steps, batch=recipe.batch, lr=recipe.base_lr,
                         seed=recipe.seed, ema=recipe.ema, log=every("base", recipe.base_steps))
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.diffusion_model.state_dict().items()}
    save_file(state, str(path), metadata={"lab_recipe": json.dumps(dataclasses.asdict(recipe))})
    model.diffusion_model.load_state_dict({k: v.float() for k, v in state.items()})
    tail = losses[-100:]
    return {"minutes": round((time.perf_counter() - started) / 60, 2), "loss_last_100": sum(tail) / len(tail)}
