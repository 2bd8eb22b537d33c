"""The pictures the nodes draw: the schedule timeline's sets agree with its steps, names are fitted
inside the image, the CLoRA overlay says which colour is which LoRA."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _util import ksample, masks_only, stack

from comfyui_cmlora.cmlora_core.cmlora import Planner
from comfyui_cmlora.nodes.clora_nodes import MaskOutput, _overlay
from comfyui_cmlora.nodes.cmlora_nodes import SchedulerNode
from comfyui_cmlora.nodes.plots import (PALETTE, PALETTE_NAMES, PAPER, draw_mask_legend, fit, mask_legend,
                                        profile_plot, profile_rows, set_lines, step_sets, timeline_plot)

A, B, C = "test_kohya_narrow.safetensors", "test_locon_narrow.safetensors", "test_peft_narrow.safetensors"
LONG = "an_extremely_long_lora_file_name_" * 6 + ".safetensors"


@pytest.fixture(autouse=True)
def _loras(models_dir):
    """The test LoRA files, registered with the host."""


def _schedule(categories, mode="offline", steps=10):
    st = stack(*[{"lora_name": n, "category": c} for n, c in zip((A, B, C), categories)])
    args = dict(mode=mode, switch_interval=2, cache="deep", refresh="nonuniform", refresh_interval=2,
                h_to_l_fraction=0.55, online_threshold=0.5, w_dom="constant", dominant_full=True,
                preview_steps=steps)
    sched, picture = SchedulerNode.execute(stack=st, **args).args
    return sched, picture, [Planner(sched, steps).plan(i) for i in range(steps)]


@pytest.mark.parametrize("categories, mode", [
    (("character", "style", "background"), "offline"),
    (("background", "background", "background"), "offline"),  # no H LoRA: the L LoRAs lead from the start
    (("character", "style", "object"), "offline"),  # no L LoRA
    (("character", "background", "style"), "async"),
])
def test_timeline_sets_agree_with_the_leading_lora_of_each_step(categories, mode):
    sched, picture, plans = _schedule(categories, mode)
    assert picture.ndim == 4 and picture.shape[-1] == 3
    letters = step_sets(plans, sched.high)
    assert len(letters) == len(plans)
    for plan, letter in zip(plans, letters):
        assert (plan.dominant in sched.high) == (letter == "H"), (plan.step, plan.dominant, letter)
    h_line, l_line = set_lines(list(sched.names), sched.high, sched.low)
    named_h = h_line.split(": ", 1)[1].split(", ")
    named_l = l_line.split(": ", 1)[1].split(", ")
    # a set said to be empty never leads a step, and every LoRA that leads is listed under its letter
    assert ("H" in letters) == (named_h != ["-"]) and ("L" in letters) == (named_l != ["-"])
    for plan, letter in zip(plans, letters):
        listed = named_h if letter == "H" else named_l
        assert sched.names[plan.dominant].rsplit(".", 1)[0] in listed


def test_timeline_without_high_frequency_loras_shows_no_h_step():
    sched, _, plans = _schedule(("background", "background", "background"))
    assert sched.high == () and "H" in {p.phase for p in plans}  # the planner's phase is only early/late
    assert step_sets(plans, sched.high) == "L" * len(plans)
    assert set_lines(list(sched.names), sched.high, sched.low)[0].endswith(": -")


def test_fit_shortens_with_an_ellipsis_only_when_needed():
    measure = len
    assert fit("short", 10, measure) == "short"
    fitted = fit("a name far too long for the room", 12, measure)
    assert fitted.endswith("…") and measure(fitted) <= 12 and "a name far too long".startswith(fitted[:-1])


def _profile(names):
    run = lambda s: {"name": "x", "score": s, "profile": [1.0 / (1 + i) for i in range(40)],  # noqa: E731
                     "curve": [s * i / 9 for i in range(10)]}
    loras = [dict(run(0.1 + 0.01 * i), name=n, set="H" if i % 2 == 0 else "L",
                  category="auto" if i < 2 else "background") for i, n in enumerate(names)]
    return {"baseline": run(0.1), "loras": loras, "source": "image", "cutoff": 0.2,
            "high": [e["name"] for e in loras if e["set"] == "H"], "low": [e["name"] for e in loras if e["set"] == "L"]}


def test_profile_legend_gives_each_lora_its_set_and_score_and_stays_inside_the_image():
    names = ["cat.safetensors", LONG, "mountains.safetensors"]
    profile = _profile(names)
    rows = profile_rows(profile)
    assert rows[0][0].startswith("no LoRA") and rows[0][2] == f"{profile['baseline']['score']:.4f}"
    for (name, key, score, note, colour), e, i in zip(rows[1:], profile["loras"], range(3)):
        assert name == e["name"].rsplit(".", 1)[0] and key == e["set"] and score == f"{e['score']:.4f}"
        assert colour == PALETTE[i] and (note == "by category") == (e["category"] != "auto")
    img = profile_plot(profile)[0].numpy()
    # nothing is drawn in the right margin: the long name was shortened, not cut at the edge
    assert np.allclose(img[:, -12:, :], PAPER[0] / 255.0)


def test_timeline_names_stay_in_their_column():
    sched, _, plans = _schedule(("character", "style", "background"))
    names = [LONG, "b.safetensors", "c.safetensors"]
    img = timeline_plot(names, plans, sched.high, sched.low, "heading")[0].numpy()
    assert np.allclose(img[:, -12:, :], PAPER[0] / 255.0)


def test_mask_legend_labels_each_colour():
    labels = ["cat (a)", "dog (b)"]
    assert mask_legend(labels) == [f"{PALETTE_NAMES[0]}: cat (a)", f"{PALETTE_NAMES[1]}: dog (b)"]
    grey = torch.full((2, 256, 256, 3), 0.5)
    out = draw_mask_legend(grey, labels + [LONG])
    assert out.shape == grey.shape
    changed = (out != grey).any(-1)  # (b, H, W)
    ys, xs = torch.nonzero(changed[0], as_tuple=True)
    assert ys.min() > 128 and xs.min() < 16 and xs.max() < 256 - 8  # a box in the lower left, inside the image
    assert torch.equal(changed[0], changed[1])  # every image of the batch gets it
    pixels = {tuple(round(float(v) * 255) for v in p) for p in out[0][changed[0]]}
    assert {PALETTE[0], PALETTE[1], PALETTE[2]} <= pixels  # one swatch per label
    # a smaller overlay names only the concepts, covering less of it
    mid = torch.full((1, 160, 160, 3), 0.5)
    covered_short = int((draw_mask_legend(mid, labels + [LONG], short=["cat", "dog", "x"]) != mid).any(-1).sum())
    covered_full = int((draw_mask_legend(mid, labels + [LONG]) != mid).any(-1).sum())
    assert 0 < covered_short < covered_full
    small = torch.full((1, 64, 64, 3), 0.5)
    assert torch.equal(draw_mask_legend(small, labels), small)  # too small to hold text: left as it is


def test_clora_masks_node_names_the_colours(sd15_narrow):
    model, clip, vae = sd15_narrow
    patched, positive = masks_only(model, clip, A, C)
    out = ksample(patched, (positive, clip.encode_from_tokens_scheduled(clip.tokenize(""))), steps=2)
    image = torch.full((1, 256, 256, 3), 0.5)
    result = MaskOutput.execute(model=patched, samples={"samples": out}, step=-1, image=image)
    masks, overlay = result.args
    text = result.ui.as_dict()["text"][0]
    assert text == "Overlay colours: red: cat (test_kohya_narrow); blue: dog (test_peft_narrow)"
    # the overlay is the tinted image with a legend box in its lower left holding both swatches
    assert overlay.shape == (1, 256, 256, 3) and masks.shape == (2, 256, 256)
    tinted = _overlay(masks.reshape(2, 1, 256, 256), image)
    changed = (overlay != tinted).any(-1)[0]
    ys, xs = torch.nonzero(changed, as_tuple=True)
    assert len(ys) and ys.min() > 128 and xs.min() < 16
    pixels = {tuple(round(float(v) * 255) for v in p) for p in overlay[0][changed]}
    assert {PALETTE[0], PALETTE[1]} <= pixels
