"""The quality lab's synthetic world: scenes of known concepts, rendered procedurally, with captions.

Concepts come in ComposLoRA's five categories, three each, with known frequency content:

- character (a figure's shape and identity details): ``orb`` (a disc with two eyes), ``block`` (a square
  with an antenna), ``spike`` (a triangle with one eye); without one, a plain ellipse;
- clothing (the figure's body): ``red`` (a red body), ``stripes`` (magenta stripes, 4-pixel period),
  ``dots`` (a grid of dots, 6-pixel period); without one, a light grey body;
- style (a high-frequency texture over the whole image): ``checker`` (2-pixel checks), ``hatch`` (diagonal
  lines, 4-pixel period), ``grain`` (a fixed random texture of high frequencies only);
- background (a low-frequency colour field, varying with the row only): ``dusk``, ``meadow``, ``sea``;
  without one, a flat beige;
- object (a small second shape right of the figure): ``ball``, ``cross``, ``box``; without one, nothing.

Images are 64x64 RGB in [0, 1]. The lab's models work in the space ``to_latent`` gives: the image
space-to-depth by 4 (48 channels at 16x16), scaled to [-1, 1]. It is exactly invertible, so a style's
2-pixel checks survive to where the profiler and the detectors look (an 8x VAE would erase them).
Everything is a function of the scene and its seed: no file, no network.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SIZE = 64
CATEGORIES = ("character", "clothing", "style", "background", "object")
CONCEPTS = {
    "character": ("orb", "block", "spike"),
    "clothing": ("red", "stripes", "dots"),
    "style": ("checker", "hatch", "grain"),
    "background": ("dusk", "meadow", "sea"),
    "object": ("ball", "cross", "box"),
}
# the figure stands left of the middle, the object right of it (the detectors read these zones)
FIGURE_ZONE, OBJECT_ZONE = (8, 44), (46, 62)
STYLE_AMPLITUDE = 0.08
BODY = (0.85, 0.85, 0.85)
# colours far from every background field, so a detector tells figure from ground pixel by pixel
CLOTHING_COLOURS = {"red": (0.85, 0.12, 0.12), "stripes": (0.9, 0.1, 0.7), "dots": (0.95, 0.75, 0.1)}
OBJECT_COLOURS = {"ball": (0.95, 0.85, 0.1), "cross": (0.1, 0.1, 0.1), "box": (0.5, 0.25, 0.05)}


def concept_category(name: str) -> str:
    for category, names in CONCEPTS.items():
        if name in names:
            return category
    raise KeyError(f"no concept named {name!r}; the world's concepts are {sorted(n for v in CONCEPTS.values() for n in v)}")


@dataclass(frozen=True)
class Scene:
    """One picture: a concept (or None) per category, and where things stand (drawn from ``seed``)."""

    character: str | None = None
    clothing: str | None = None
    style: str | None = None
    background: str | None = None
    object: str | None = None
    seed: int = 0

    def concepts(self) -> dict[str, str]:
        return {c: getattr(self, c) for c in CATEGORIES if getattr(self, c) is not None}

    @staticmethod
    def of(concepts, seed: int = 0) -> "Scene":
        """The scene holding these concept names (one per category at most)."""
        chosen: dict[str, str] = {}
        for name in concepts:
            category = concept_category(name)
            if category in chosen:
                raise ValueError(f"two {category} concepts: {chosen[category]!r} and {name!r}")
            chosen[category] = name
        return Scene(**chosen, seed=seed)


def random_scene(rng: random.Random, present: float = 0.5) -> Scene:
    """A scene with each category's concept present with probability ``present`` (which one: uniform)."""
    chosen = {c: rng.choice(CONCEPTS[c]) for c in CATEGORIES if rng.random() < present}
    return Scene(**chosen, seed=rng.randrange(2**31))


# ---------------------------------------------------------------- drawing

def _grid():
    y, x = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                          indexing="ij")
    return y, x


def background_field(name: str | None) -> torch.Tensor:
    """(3, 64, 64) colour field that varies with the row only (low frequencies)."""
    t = torch.linspace(0.0, 1.0, SIZE)[:, None].expand(SIZE, SIZE)
    if name is None:
        rgb = [torch.full_like(t, v) for v in (0.62, 0.56, 0.45)]
    elif name == "dusk":
        rgb = [0.95 - 0.45 * t, 0.55 - 0.35 * t, 0.25 + 0.35 * t]
    elif name == "meadow":
        s = torch.sigmoid((t - 0.55) * 10)
        rgb = [0.55 - 0.4 * s, 0.75 - 0.1 * s, 0.95 - 0.8 * s]
    elif name == "sea":
        wave = 0.5 + 0.5 * torch.sin(2 * math.pi * 1.5 * t)
        rgb = [0.05 + 0.1 * wave, 0.25 + 0.2 * wave, 0.55 + 0.25 * wave]
    else:
        raise KeyError(name)
    return torch.stack(rgb)


def style_pattern(name: str) -> torch.Tensor:
    """(64, 64) zero-mean texture of a style, values in [-1, 1], fixed in the image's coordinates."""
    y, x = _grid()
    if name == "checker":
        return ((x + y) % 2) * 2 - 1
    if name == "hatch":
        return torch.where((x + y) % 4 < 2, 1.0, -1.0)
    if name == "grain":
        g = torch.Generator().manual_seed(1234)
        noise = torch.randn(SIZE, SIZE, generator=g)
        spectrum = torch.fft.fft2(noise)
        fy = torch.fft.fftfreq(SIZE)[:, None].abs()
        fx = torch.fft.fftfreq(SIZE)[None, :].abs()
        spectrum = spectrum * ((torch.maximum(fy, fx) >= 0.3).float())  # high frequencies only
        tex = torch.fft.ifft2(spectrum).real
        return (tex / tex.abs().max()).clamp(-1, 1)
    raise KeyError(name)


def clothing_pattern(name: str) -> torch.Tensor:
    """(64, 64) {0, 1}: where the clothing's colour goes on the body (the rest stays light grey)."""
    y, x = _grid()
    if name == "red":
        return torch.ones(SIZE, SIZE)
    if name == "stripes":
        return ((y % 4) < 2).float()
    if name == "dots":
        return (((y % 6) - 2.5) ** 2 + ((x % 6) - 2.5) ** 2 <= 2.3 ** 2).float()
    raise KeyError(name)


def _figure_mask(character: str | None, cx: float, cy: float, r: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(body, details): the figure's body and its identity details (eyes, antenna), {0, 1} each."""
    y, x = _grid()
    details = torch.zeros(SIZE, SIZE)
    if character is None:  # a plain ellipse, narrower than tall
        body = (((x - cx) / (0.6 * r)) ** 2 + ((y - cy) / r) ** 2 <= 1).float()
    elif character == "orb":
        body = ((x - cx) ** 2 + (y - cy) ** 2 <= r * r).float()
        for ex in (cx - 0.4 * r, cx + 0.4 * r):
            details += ((x - ex) ** 2 + (y - (cy - 0.3 * r)) ** 2 <= (0.16 * r) ** 2).float()
    elif character == "block":
        body = ((x - cx).abs() <= 0.85 * r).float() * ((y - cy).abs() <= 0.85 * r).float()
        antenna = ((x - cx).abs() <= 1).float() * (y >= cy - 1.35 * r).float() * (y < cy - 0.85 * r).float()
        body = torch.maximum(body, antenna)
        details += antenna
    elif character == "spike":
        top, bottom = cy - r, cy + r
        half = (y - top) / (bottom - top) * r
        body = ((y >= top) & (y <= bottom) & ((x - cx).abs() <= half)).float()
        details += ((x - cx) ** 2 + (y - (cy + 0.2 * r)) ** 2 <= (0.2 * r) ** 2).float()
    else:
        raise KeyError(character)
    return body, details.clamp(max=1)


def _object_mask(name: str, cx: float, cy: float, r: float) -> torch.Tensor:
    y, x = _grid()
    if name == "ball":
        return ((x - cx) ** 2 + (y - cy) ** 2 <= r * r).float()
    if name == "cross":
        arm = 0.35 * r
        return ((((x - cx).abs() <= arm) & ((y - cy).abs() <= r)) | (((y - cy).abs() <= arm) & ((x - cx).abs() <= r))).float()
    if name == "box":
        return (((x - cx).abs() <= 0.85 * r) & ((y - cy).abs() <= 0.85 * r)).float()
    raise KeyError(name)


def layout(scene: Scene) -> dict:
    """Where the figure and the object stand: centre and radius of each, drawn from the scene's seed."""
    rng = random.Random(scene.seed)
    r = rng.uniform(9.0, 12.0)
    cx = rng.uniform(FIGURE_ZONE[0] + r + 1, FIGURE_ZONE[1] - r - 1)
    cy = rng.uniform(20.0 + 0.35 * r, 44.0 - 0.35 * r)
    orr = rng.uniform(4.5, 6.0)
    ox = rng.uniform(OBJECT_ZONE[0] + orr + 0.5, OBJECT_ZONE[1] - orr)
    oy = rng.uniform(22.0, 42.0)
    return {"figure": (cx, cy, r), "object": (ox, oy, orr)}


def render(scene: Scene) -> torch.Tensor:
    """The scene as a (3, 64, 64) image in [0, 1]."""
    place = layout(scene)
    img = background_field(scene.background).clone()
    body, details = _figure_mask(scene.character, *place["figure"])
    colour = torch.tensor(BODY)[:, None, None].expand(3, SIZE, SIZE)
    if scene.clothing is not None:
        worn = torch.tensor(CLOTHING_COLOURS[scene.clothing])[:, None, None]
        colour = torch.where(clothing_pattern(scene.clothing)[None] > 0, worn, colour)
    img = torch.where(body[None] > 0, colour, img)
    img = torch.where(details[None] > 0, torch.tensor((0.08, 0.08, 0.08))[:, None, None], img)
    if scene.object is not None:
        mask = _object_mask(scene.object, *place["object"])
        img = torch.where(mask[None] > 0, torch.tensor(OBJECT_COLOURS[scene.object])[:, None, None], img)
    if scene.style is not None:
        img = img + STYLE_AMPLITUDE * style_pattern(scene.style)[None]
    return img.clamp(0, 1)


def caption(scene: Scene, triggers: dict[str, str] | None = None) -> str:
    """A caption in plain words; ``triggers`` (concept -> trigger word) puts a LoRA's trigger in front of
    its concept's words, as the captions of a LoRA's training set do."""
    triggers = triggers or {}

    def word(name, text):
        return f"{triggers[name]} {text}" if name in triggers else text

    c = scene.concepts()
    figure = word(c["character"], f"{c['character']} character") if "character" in c else "a figure"
    if "clothing" in c:
        figure += " wearing " + word(c["clothing"], f"{c['clothing']} clothes")
    parts = [figure]
    if "object" in c:
        parts.append("with a " + word(c["object"], c["object"]))
    if "background" in c:
        parts.append("in front of a " + word(c["background"], f"{c['background']} background"))
    text = " ".join(parts)
    if "style" in c:
        text += ", " + word(c["style"], f"{c['style']} style")
    return text


# ---------------------------------------------------------------- the lab's model space

def to_latent(images: torch.Tensor) -> torch.Tensor:
    """(b, 3, 64, 64) in [0, 1] -> (b, 48, 16, 16) in [-1, 1]: space-to-depth by 4, every pixel kept."""
    return F.pixel_unshuffle(images * 2 - 1, 4)


def from_latent(latent: torch.Tensor) -> torch.Tensor:
    """The inverse of ``to_latent`` (values clamped to [0, 1])."""
    return ((F.pixel_shuffle(latent, 4) + 1) / 2).clamp(0, 1)
