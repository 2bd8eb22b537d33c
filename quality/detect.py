"""Closed-form detectors for the synthetic world's concepts: what an image shows, per category.

Each reads the image the way the world draws it (``quality.world``), not a learned model:

- background: the mean colour of each row over the left margin (columns 0-7, where nothing else is
  drawn; 8 columns cancel the checker and hatch textures), nearest of the world's fields;
- style: the image's correlation with each style's texture after removing every 4x4 block's mean
  (the world's smooth content has almost none of those frequencies), present above half the
  texture's amplitude;
- character: the figure is what differs from the background rows left of the object zone, pixel by
  pixel once the style's texture is subtracted; its row widths tell a triangle (much narrower at 30%
  of its height than at 80%) and a square (as wide at 90% as at 50%) from a round shape, and its width
  over height a disc from the plain ellipse;
- clothing: the colours inside the figure (its edge and dark details left out): red, the stripes' blue
  or the dots' yellow on enough of the body, else none;
- object: what differs from the background in the object zone, by its colour.

``validate`` measures their accuracy on clean renders of random scenes (the lab's own check before
any comparison).
"""
from __future__ import annotations

import functools
import random

import torch
import torch.nn.functional as F

from .world import (CATEGORIES, CLOTHING_COLOURS, CONCEPTS, OBJECT_COLOURS, OBJECT_ZONE, STYLE_AMPLITUDE,
                    Scene, background_field, random_scene, render, style_pattern)

MARGIN = 8  # columns 0..7: background (and style) only
FOREGROUND = 0.3  # summed absolute difference from the row's background
COLOUR_MATCH = 0.35  # summed absolute difference to a clothing or object colour

def _opened(mask: torch.Tensor) -> torch.Tensor:
    """A 3x3 morphological opening of a (64, 64) bool mask: specks of noise go, 3-pixel-wide parts stay."""
    m = mask.float()[None, None]
    m = -F.max_pool2d(-m, 3, stride=1, padding=1)
    return F.max_pool2d(m, 3, stride=1, padding=1)[0, 0] > 0


def background_rows(img: torch.Tensor) -> torch.Tensor:
    """(3, 64, 1): each row's background colour, from the left margin."""
    return img[:, :, :MARGIN].mean(-1, keepdim=True)

def detect_background(img: torch.Tensor) -> str | None:
    rows = background_rows(img)
    names = [None, *CONCEPTS["background"]]
    dist = [float((rows - background_field(n)[:, :, :1]).abs().mean()) for n in names]
    return names[min(range(len(names)), key=dist.__getitem__)]

def style_scores(img: torch.Tensor) -> dict[str, float]:
    """Each style's amplitude in the image (about STYLE_AMPLITUDE when present, about 0 when not)."""
    grey = img.mean(0)
    blocks = F.avg_pool2d(grey[None, None], 4)[0, 0].repeat_interleave(4, 0).repeat_interleave(4, 1)
    residual = grey - blocks
    out = {}
    for name in CONCEPTS["style"]:
        p = style_pattern(name)
        p = p - F.avg_pool2d(p[None, None], 4)[0, 0].repeat_interleave(4, 0).repeat_interleave(4, 1)
        out[name] = float((residual * p).sum() / (p * p).sum())
    return out

def detect_style(img: torch.Tensor) -> str | None:
    scores = style_scores(img)
    best = max(scores, key=scores.get)
    return best if scores[best] > STYLE_AMPLITUDE / 2 else None

def destyled(img: torch.Tensor) -> torch.Tensor:
    """The image less the texture of the style it shows (at the amplitude measured)."""
    scores = style_scores(img)
    best = max(scores, key=scores.get)
    return img - scores[best] * style_pattern(best)[None] if scores[best] > STYLE_AMPLITUDE / 2 else img


def foreground(img: torch.Tensor) -> torch.Tensor:
    """(64, 64) bool: the pixels that differ from their row's background, the style's texture removed
    (specks of noise opened away: a model's samples are never clean)."""
    plain = destyled(img)
    return _opened((plain - background_rows(plain)).abs().sum(0) > FOREGROUND)


def _figure(img: torch.Tensor) -> torch.Tensor:
    fg = foreground(img)
    fg[:, OBJECT_ZONE[0] - 1:] = False
    fg[:, :MARGIN] = False
    return fg

def detect_character(img: torch.Tensor) -> str | None:
    fg = _figure(img)
    if int(fg.sum()) < 30:
        return None  # no figure at all: the base model's plain ellipse is missing too
    rows = torch.nonzero(fg.any(1)).flatten()
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    widths = fg[top:bottom].float().sum(1)
    h, w = bottom - top, float(widths.max())

    def width_at(f: float) -> float:
        return float(widths[min(h - 1, int(f * h))])

    if width_at(0.3) < 0.6 * width_at(0.8):  # widening downwards: a triangle
        return "spike"
    if width_at(0.9) > 0.9 * width_at(0.5):  # as wide near the bottom as at mid-height: a square
        return "block"
    return "orb" if w / h > 0.8 else None


def _colour_share(pixels: torch.Tensor, colour) -> float:
    """The share of the (3, n) pixels within COLOUR_MATCH of ``colour``."""
    ref = torch.tensor(colour)[:, None]
    return float(((pixels - ref).abs().sum(0) < COLOUR_MATCH).float().mean()) if pixels.shape[1] else 0.0

CLOTHING_SHARE = {"red": 0.6, "stripes": 0.25, "dots": 0.12}  # of the body's light pixels, to count as worn
OBJECT_SHARE = 0.3  # of the object zone's foreground pixels


def _clothing_pixels(img: torch.Tensor) -> torch.Tensor:
    """(3, n): the figure's pixels 2 pixels in from its edge, the dark eyes and antenna left out."""
    body = _figure(img).float()
    body = -F.max_pool2d(-body[None, None], 5, stride=1, padding=2)[0, 0] > 0
    pixels = img[:, body]
    return pixels[:, pixels.mean(0) > 0.2]


def _object_pixels(img: torch.Tensor) -> torch.Tensor:
    """(3, n): what differs from the background in the object zone."""
    fg = foreground(img)
    fg[:, :OBJECT_ZONE[0] - 1] = False
    return img[:, fg]


def detect_clothing(img: torch.Tensor) -> str | None:
    pixels = _clothing_pixels(img)
    if pixels.shape[1] < 20:
        return None
    shares = {name: _colour_share(pixels, colour) for name, colour in CLOTHING_COLOURS.items()}
    found = [n for n in shares if shares[n] >= CLOTHING_SHARE[n]]
    return max(found, key=lambda n: shares[n] / CLOTHING_SHARE[n]) if found else None

def detect_object(img: torch.Tensor) -> str | None:
    pixels = _object_pixels(img)
    if pixels.shape[1] < 15:
        return None
    shares = {name: _colour_share(pixels, colour) for name, colour in OBJECT_COLOURS.items()}
    best = max(shares, key=shares.get)
    return best if shares[best] > OBJECT_SHARE else None

DETECTORS = {"character": detect_character, "clothing": detect_clothing, "style": detect_style,
             "background": detect_background, "object": detect_object}

def detect(img: torch.Tensor) -> dict[str, str | None]:
    """What the (3, 64, 64) image in [0, 1] shows: a concept name or None per category."""
    return {c: DETECTORS[c](img) for c in CATEGORIES}

def confusion(count: int = 500, seed: int = 2026) -> list[tuple]:
    """(category, truth, found, scene) of every category read wrong in clean renders of ``count`` random
    scenes (every category present in about half of them)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        scene = random_scene(rng)
        found = detect(render(scene))
        out += [(c, getattr(scene, c), found[c], scene) for c in CATEGORIES if found[c] != getattr(scene, c)]
    return out


def validate(count: int = 500, seed: int = 2026) -> dict[str, float]:
    """Each detector's accuracy on those renders, and the share of scenes read entirely right."""
    wrong = confusion(count, seed)
    accuracy = {c: 1 - sum(w[0] == c for w in wrong) / count for c in CATEGORIES}
    return {**accuracy, "all": 1 - len({id(w[3]) for w in wrong}) / count}


def _background_confidence(img: torch.Tensor, name: str | None) -> float:
    rows = background_rows(img)
    dist = {n: float((rows - background_field(n)[:, :, :1]).abs().mean()) for n in [None, *CONCEPTS["background"]]}
    other = min(d for n, d in dist.items() if n != name)
    return other / (dist[name] + other) if dist[name] + other > 0 else 0.0


def _share(img: torch.Tensor, category: str, name: str) -> float:
    if category == "clothing":
        return _colour_share(_clothing_pixels(img), CLOTHING_COLOURS[name])
    return _colour_share(_object_pixels(img), OBJECT_COLOURS[name])


@functools.lru_cache(maxsize=None)
def _clean_share(category: str, name: str) -> float:
    """The colour share clean renders of the concept alone show, on average over 16 layouts (a pattern's share
    of a body varies with where the body stands)."""
    return sum(_share(render(Scene.of([name], seed=s)), category, name) for s in range(16)) / 16


def confidence(img: torch.Tensor, wanted: dict[str, str]) -> float:
    """A fidelity measure: the mean over the wanted concepts (category -> name) of how clearly the image
    shows each, each detector's own measure relative to what a clean render measures, clipped to [0, 1]:
    the style's amplitude over STYLE_AMPLITUDE; the share of the clothing's or the object's colour over a
    clean render's share; for the background, the distance to the nearest other field over the sum of
    that and the distance to its own (1 on the field, 0.5 halfway to another). A character is read by
    shape rules with no margin: 1 when detected, else 0."""
    values = []
    for category, name in wanted.items():
        if category == "style":
            v = style_scores(img)[name] / STYLE_AMPLITUDE
        elif category == "background":
            v = _background_confidence(img, name)
        elif category in ("clothing", "object"):
            v = _share(img, category, name) / _clean_share(category, name)
        else:
            v = float(detect_character(img) == name)
        values.append(min(1.0, max(0.0, v)))
    return sum(values) / len(values) if values else float("nan")
