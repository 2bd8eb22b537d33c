"""The reference's exact measures (host-free): each expected value is computed here from the
reference's recipe, in a few lines of numpy/PIL or by hand, independently of the code under test."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from cmlora_core.clora import morphology, nt_xent, update_plan
from cmlora_core.cmlora import Planner, Schedule, ScheduleSettings, refresh_steps
from cmlora_core.spectrum import image_score, radial_profile, grey_8bit
from cmlora_core.steps import StepClock


def _fixed_image() -> torch.Tensor:
    """A 512x512 RGB image in [0, 1] with edges, a gradient and texture (fixed by formula and seed)."""
    y, x = torch.meshgrid(torch.arange(512.0), torch.arange(512.0), indexing="ij")
    g = torch.Generator().manual_seed(1234)
    r = 0.5 + 0.5 * torch.sin(x / 9.0) * torch.cos(y / 23.0)
    gr = ((x // 32 + y // 32) % 2) * 0.7 + 0.1
    b = (x + y) / 1024.0 + 0.1 * torch.rand(512, 512, generator=g)
    return torch.stack([r, gr, b]).clamp(0, 1)


def _reference_score(image: torch.Tensor) -> tuple[np.ndarray, float]:
    """The notebook's recipe: 8-bit file -> PIL grey -> fftshift(fft2) -> log(|F| + 1e-8) -> mean per
    ring of floor radius (corners included) -> / max -> mean over r >= 72."""
    u8 = np.clip(255.0 * image.permute(1, 2, 0).numpy(), 0, 255).astype(np.uint8)
    grey = np.asarray(Image.fromarray(u8).convert("L"), dtype=np.float64)
    mag = np.log(np.abs(np.fft.fftshift(np.fft.fft2(grey))) + 1e-8)
    yy, xx = np.indices(grey.shape)
    r = np.floor(np.sqrt((xx - 256) ** 2 + (yy - 256) ** 2)).astype(int)
    profile = np.bincount(r.ravel(), mag.ravel()) / np.bincount(r.ravel())
    profile = profile / profile.max()
    return profile, float(profile[72:].mean())


def test_profiling_score_of_a_fixed_512_image_is_the_reference_recipe():
    image = _fixed_image()
    ref_profile, ref_score = _reference_score(image)
    assert len(ref_profile) == 363  # rings 0..362: out to the corner
    u8 = np.clip(255.0 * image.permute(1, 2, 0).numpy(), 0, 255).astype(np.uint8)
    assert np.array_equal(grey_8bit(image).numpy(), np.asarray(Image.fromarray(u8).convert("L"), dtype=np.float32))
    profile = radial_profile(grey_8bit(image))
    assert profile.shape == (363,)
    assert np.allclose(profile.numpy(), ref_profile, rtol=1e-5, atol=1e-6)
    assert image_score(image) == pytest.approx(ref_score, rel=1e-6)


def test_nt_xent_leaves_other_positives_out_of_the_denominator():
    # three maps of concept 0 (a, b, c) and one of concept 1 (d): a SupCon-style denominator would
    # hold the anchor's other positive; the reference's holds only the pair and the negatives
    maps = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 3.0, 2.0], [1.0, 0.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]])
    concept = [0, 0, 0, 1]
    t = 0.5
    z = [(m - m.min()) / (m.max() - m.min()) for m in maps]
    z = [v / v.norm() for v in z]
    s = [[float(z[i] @ z[j]) / t for j in range(4)] for i in range(4)]
    pairs = []
    for a in range(4):
        for p in range(4):
            if a != p and concept[a] == concept[p]:
                neg = sum(math.exp(s[a][n]) for n in range(4) if concept[n] != concept[a])
                pairs.append(-math.log(math.exp(s[a][p]) / (math.exp(s[a][p]) + neg)))
    expected = sum(pairs) / len(pairs)
    assert len(pairs) == 6
    assert float(nt_xent(maps, concept, t)) == pytest.approx(expected, rel=1e-6)


def test_nonuniform_refresh_is_the_references_three_ranges():
    assert refresh_steps(20, "nonuniform") == [0, 2, 4, 6, 7, 10, 13, 16, 17, 19]
    for total in range(1, 260):
        a, b = int(0.375 * total), int(0.875 * total)
        expected = list(range(0, a, 2)) + list(range(a, b, 3)) + list(range(b, total, 2))
        assert refresh_steps(total, "nonuniform") == expected, total


def test_offline_phase_boundary_for_055_of_220_is_step_121():
    assert 0.55 * 220 > 121  # float noise: 121.00000000000001
    plan = Planner(Schedule(ScheduleSettings(mode="offline", h_to_l_fraction=0.55), (0,), (1,), ("h", "l")), 220)
    phases = [plan.plan(i).phase for i in range(220)]
    assert phases.index("L") == 121 and set(phases[:121]) == {"H"} and set(phases[121:]) == {"L"}
    assert max(update_plan(220, 0.55, 0)) == 120  # CLoRA's stop compares i < f*T the same way


def _by_hand(mask: list[list[int]], op: str) -> list[list[int]]:
    h, w = len(mask), len(mask[0])

    def window(m, i, j):
        return [m[a][b] for a in range(i - 1, i + 2) for b in range(j - 1, j + 2) if 0 <= a < h and 0 <= b < w]

    def dil(m):
        return [[max(window(m, i, j)) for j in range(w)] for i in range(h)]

    def ero(m):
        return [[min(window(m, i, j)) for j in range(w)] for i in range(h)]

    return {"dilate": dil, "erode": ero, "open": lambda m: dil(ero(m)), "close": lambda m: ero(dil(m))}[op](mask)


@pytest.mark.parametrize("op", ["dilate", "erode", "open", "close"])
def test_3x3_morphology(op):
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(2, 3, 7, 9, generator=g) > 0.45).float()
    mask[0, 0, 2:6, 3:8] = 1  # a block that opening keeps
    mask[0, 0, 0, 0] = 1  # a corner pixel (borders ignore the outside)
    out = morphology(mask, op)
    for i in range(2):
        for j in range(3):
            assert out[i, j].tolist() == _by_hand(mask[i, j].int().tolist(), op)
    assert torch.equal(morphology(mask, "none"), mask)


def test_heun_corrector_belongs_to_the_step_it_corrects():
    sigmas = [10.0, 5.0, 2.0, 1.0, 0.0]
    # sample_heun evaluates step i at sigma[i] and, unless sigma[i+1] is 0, at sigma[i+1]
    heun = [(10.0, 0), (5.0, 0), (5.0, 1), (2.0, 1), (2.0, 2), (1.0, 2), (1.0, 3)]
    clock = StepClock("sample_heun")
    assert [clock.step(sigmas, s) for s, _ in heun] == [i for _, i in heun]
    # Heun++: sigma[i], sigma[i+1] and sigma[i+2] while they are not the last point
    heunpp = [(10.0, 0), (5.0, 0), (2.0, 0), (5.0, 1), (2.0, 1), (1.0, 1), (2.0, 2), (1.0, 2), (1.0, 3)]
    clock = StepClock("sample_heunpp2")
    assert [clock.step(sigmas, s) for s, _ in heunpp] == [i for _, i in heunpp]
    # one evaluation per point (euler), and midpoints (dpm_2): by sigma
    clock = StepClock("sample_euler")
    assert [clock.step(sigmas, s) for s in (10.0, 5.0, 2.0, 1.0)] == [0, 1, 2, 3]
    clock = StepClock("sample_dpm_2")
    assert [clock.step(sigmas, s) for s in (10.0, 7.0, 5.0, 3.1)] == [0, 0, 1, 1]
