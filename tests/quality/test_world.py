"""The quality lab's synthetic world and its detectors (host-free): the world's frequency content is
what the lab claims, the detectors read held-out renders (clean and noisy), each concept moves only its
own detector, and the lab's model space keeps every pixel."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from quality.detect import detect, validate
from quality.world import (CATEGORIES, CONCEPTS, SIZE, Scene, background_field, caption, from_latent, random_scene,
                           render, style_pattern, to_latent)

TUNED_ON = 2026  # the seed the detectors' thresholds were chosen on; the tests draw other scenes


def _radial_energy(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(radius in cycles per pixel, power) of every 2-D frequency of a (64, 64) array, its mean removed and
    a Hann window applied (without it the frame's edges would read as a jump of every field)."""
    window = np.outer(np.hanning(SIZE), np.hanning(SIZE))
    power = np.abs(np.fft.fft2((image - image.mean()) * window)) ** 2
    f = np.fft.fftfreq(SIZE)
    radius = np.hypot(f[:, None], f[None, :])
    return radius.ravel(), power.ravel()


@pytest.mark.parametrize("name", CONCEPTS["style"])
def test_styles_are_high_frequency_textures(name):
    radius, power = _radial_energy(style_pattern(name).numpy())
    assert power[radius >= 0.25].sum() / power.sum() > 0.9  # periods of 4 pixels and finer


@pytest.mark.parametrize("name", CONCEPTS["background"])
def test_backgrounds_are_low_frequency_fields(name):
    for channel in background_field(name).numpy():
        radius, power = _radial_energy(channel)
        assert power[radius <= 0.05].sum() / power.sum() > 0.97  # periods of 20 pixels and longer


def test_detectors_read_held_out_renders():
    accuracy = validate(300, seed=TUNED_ON + 1)
    assert all(accuracy[c] >= 0.95 for c in CATEGORIES), accuracy


def test_detectors_read_noisy_renders():
    """A model's samples are never clean: Gaussian noise of 0.04 on every pixel."""
    rng, g = random.Random(TUNED_ON + 2), torch.Generator().manual_seed(3)
    right = dict.fromkeys(CATEGORIES, 0)
    for _ in range(200):
        scene = random_scene(rng)
        found = detect((render(scene) + 0.04 * torch.randn(3, SIZE, SIZE, generator=g)).clamp(0, 1))
        for c in CATEGORIES:
            right[c] += found[c] == getattr(scene, c)
    assert all(right[c] >= 0.95 * 200 for c in CATEGORIES), right


def test_each_concept_moves_only_its_own_detector():
    full = Scene.of(["orb", "stripes", "hatch", "sea", "ball"], seed=5)
    assert detect(render(full)) == full.concepts()
    for category in CATEGORIES:
        for name in CONCEPTS[category]:
            scene = Scene(**{**full.concepts(), category: name}, seed=5)
            found = detect(render(scene))
            assert found == scene.concepts() | {c: None for c in CATEGORIES if c not in scene.concepts()}, name
        without = Scene(**{**full.concepts(), category: None}, seed=5)
        assert detect(render(without)) == {**full.concepts(), category: None}, category


def test_the_lab_space_keeps_every_pixel():
    img = render(Scene.of(["spike", "dots", "checker", "dusk", "cross"], seed=9))
    latent = to_latent(img[None])
    assert latent.shape == (1, 48, 16, 16) and float(latent.min()) >= -1 and float(latent.max()) <= 1
    back = from_latent(latent)[0]
    assert torch.allclose(back, img, atol=1e-6)
    assert detect(back)["style"] == "checker"  # the 2-pixel checks survive the lab's model space


def test_captions_and_scenes():
    scene = Scene.of(["block", "red", "grain", "meadow", "box"])
    assert caption(scene) == "block character wearing red clothes with a box in front of a meadow background, grain style"
    assert caption(scene, {"block": "sks", "grain": "zwx"}).startswith("sks block character")
    assert caption(scene, {"grain": "zwx"}).endswith(", zwx grain style")
    assert caption(Scene()) == "a figure"
    with pytest.raises(ValueError, match="two character concepts"):
        Scene.of(["orb", "block"])
    with pytest.raises(KeyError, match="no concept named 'cat'"):
        Scene.of(["cat"])
