"""CMLoRA Compare Methods on the real host: each tile is the method's own run, labels, FLOP ratios, errors, no leak."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import comfy.model_management
import comfy.patcher_extension
import folder_paths
import nodes as host_nodes

from _util import TorchFlops, digests, ksample, real_pass_flops, stack

from comfyui_cmlora.cmlora_core.errors import CMLoRAError
from comfyui_cmlora.nodes.apply_nodes import SamplerNode
from comfyui_cmlora.nodes.cmlora_nodes import SchedulerNode
from comfyui_cmlora.nodes.compare_nodes import BACKGROUND, CompareMethodsNode, grid_layout

A, B = "test_kohya_narrow.safetensors", "test_locon_narrow.safetensors"
NODE = "CMLoRA Compare Methods"
STEPS = 3
SAMPLING = dict(seed=7, steps=STEPS, cfg=5.0, sampler_name="euler", scheduler="normal")


@pytest.fixture(autouse=True)
def temp_dir(tmp_path):
    """The node's preview goes to the host's temp folder: a folder of this test's own."""
    before = folder_paths.get_temp_directory()
    folder_paths.set_temp_directory(str(tmp_path))
    yield tmp_path
    folder_paths.set_temp_directory(before)


def two_loras():
    return stack({"lora_name": A, "strength_model": 1.0, "category": "character"},
                 {"lora_name": B, "strength_model": 0.8, "category": "background"})


def masked_stack():
    """A on the left half of the image (no feathering), B everywhere else."""
    left = torch.zeros(1, 64, 64)
    left[:, :, :32] = 1.0
    return stack({"lora_name": A, "strength_model": 1.0, "mask": left, "mask_feather": 0}, (B, 0.8))


def schedule_for(st):
    return SchedulerNode.execute(stack=st, mode="offline", switch_interval=1, cache="deep", refresh="uniform",
                                 refresh_interval=2, h_to_l_fraction=0.5, online_threshold=0.5, w_dom="constant",
                                 dominant_full=True, preview_steps=8).args[0]


def compare(models, conds, st, methods, schedule=None, size=8, batch=1, switch_interval=1, model=None, **sampling):
    pos, neg = conds
    return CompareMethodsNode.execute(model=model or models[0], stack=st, positive=pos, negative=neg,
                                      latent_image={"samples": torch.zeros(batch, 4, size, size)}, vae=models[2],
                                      methods=methods, switch_interval=switch_interval, schedule=schedule,
                                      **{**SAMPLING, **sampling})


def alone(models, conds, st, method, schedule=None, size=8, batch=1, flops: TorchFlops | None = None):
    """The method run on its own: CMLoRA Sampler (the base model: the host's KSampler), then VAE Decode;
    ``flops`` counts its model calls."""
    pos, neg = conds
    latent = {"samples": torch.zeros(batch, 4, size, size)}
    model = models[0] if flops is None else flops.attach(models[0])
    if method == "base":
        out = host_nodes.KSampler().sample(model, SAMPLING["seed"], STEPS, SAMPLING["cfg"], "euler", "normal",
                                           pos, neg, latent)[0]
        report = ""
    else:
        out, report = SamplerNode.execute(model=model, stack=st, method=method, switch_interval=1,
                                          schedule=schedule, positive=pos, negative=neg, latent_image=latent,
                                          denoise=1.0, **SAMPLING).args
    return host_nodes.VAEDecode().decode(models[2], out)[0], report


def measured_ratios(models, conds, st, methods, schedule=None) -> dict[str, float]:
    """Each method's model FLOPs over the base model's (merge's passes: one per call), as torch counts
    them running (TorchFlops): the expectation of Compare Methods' labels, made without the pack's count."""
    totals = {}
    for method in ["base", *methods]:
        flops = TorchFlops()
        alone(models, conds, st, method, schedule if method == "cmlora" else None, flops=flops)
        totals[method] = flops.total
    return {m: totals[m] / totals["base"] for m in methods}


def ratios(report: str) -> dict[str, float]:
    return {m: float(r) for m, r in re.findall(r"^(\w+): [\d.]+ s .*?, ([\d.]+)x the model FLOPs of merge", report, re.M)}


def test_each_tile_is_the_method_run_alone_with_labels_and_flop_ratios(sd15_narrow, conds, temp_dir):
    st = two_loras()
    sched = schedule_for(st)
    methods = ["base", "merge", "switch", "composite", "cmlora"]
    out = compare(sd15_narrow, conds, st, ", ".join(methods), sched)
    grid, report = out.args
    assert grid.shape[0] == 1 and grid.shape[-1] == 3
    layout = grid_layout(methods, 1, 64, 64)
    assert tuple(grid.shape[1:3]) == (layout.height, layout.width)

    tiles, counted = [], {}
    for col, method in enumerate(methods):
        x0, y0, x1, y1 = layout.tile_box(col)
        tile = grid[0, y0:y1, x0:x1]
        counted[method] = TorchFlops()
        expected, _ = alone(sd15_narrow, conds, st, method, sched if method == "cmlora" else None,
                            flops=counted[method])
        assert torch.allclose(tile, expected[0], atol=1e-5), (method, (tile - expected[0]).abs().max())
        tiles.append(tile)
    # the tiles really differ (each column is its own method, not one image repeated)
    for i in range(len(tiles)):
        for j in range(i + 1, len(tiles)):
            assert not torch.allclose(tiles[i], tiles[j], atol=1e-3), (methods[i], methods[j])

    # labels: text in every strip, a different text under every column
    strips = []
    for col in range(len(methods)):
        x0, y0, x1, y1 = layout.label_box(col)
        strip = (grid[0, y0:y1, x0:x1] * 255).round().numpy().astype(np.uint8)
        text_rows = np.nonzero((np.abs(strip.astype(int) - np.array(BACKGROUND)).max(-1) > 60).any(1))[0]
        assert len(text_rows) >= 3 * 8, (methods[col], len(text_rows))  # three lines of readable height
        strips.append(strip)
    for i in range(len(strips)):
        for j in range(i + 1, len(strips)):
            assert not np.array_equal(strips[i], strips[j])

    # FLOPs relative to merge: each method's run alone, counted by torch as it ran, over the base model's
    r = ratios(report)
    assert list(r) == methods
    assert r["merge"] == 1.0 and r["base"] == 1.0 and r["switch"] == 1.0  # LoRAs in the weights
    # (switch folds its LoRA into the weights between steps, inside the model call, where torch's count
    # sees the folding's products; labels leave folding out, so its 1.0 above is the check)
    for method in set(methods) - {"switch"}:  # the label prints 3 decimals; the pack counts a pass on meta
        assert r[method] == pytest.approx(counted[method].total / counted["base"].total, abs=1e-3), method
    # composite: one copy of every row per LoRA, and each copy's LoRA products on top
    assert r["composite"] > 2.0 + 1e-3
    # CMLoRA by hand: one model call per step; step 0 runs both LoRAs' full passes, steps 1 and 2 the
    # dominant's full pass and the other's shallow one (each as torch counts it running), plus products
    full_flops, shallow_flops = real_pass_flops(sd15_narrow[0])
    assert r["cmlora"] > (4 * full_flops + 2 * shallow_flops) / (3 * full_flops) + 1e-3

    # the preview on the node and the report text
    assert len(out.ui["images"]) == 1 and (temp_dir / out.ui["images"][0]["filename"]).exists()
    assert out.ui["text"] == (report,)


def test_flop_ratio_follows_the_step_ranges_the_run_had(sd15_narrow, conds):
    """A LoRA on the first half of the steps only: composite runs two copies there and one after; merge
    with a range routes both LoRAs' deltas in the forward, so it costs more than the base model."""
    st = stack({"lora_name": A, "strength_model": 1.0, "end_at": 0.5}, (B, 0.8))
    r = ratios(compare(sd15_narrow, conds, st, "merge, composite").args[1])
    expected = measured_ratios(sd15_narrow, conds, st, ["merge", "composite"])
    assert r == pytest.approx(expected, abs=1e-3)
    # ranges are measured on the noise level; the normal scheduler starts step i at place i / (STEPS - 1)
    on = [s for s in range(STEPS) if s / (STEPS - 1) < 0.5]
    assert on == [0]
    copies = sum(2 if s in on else 1 for s in range(STEPS))  # both LoRAs while A is on, B alone after
    assert copies / STEPS + 1e-3 < r["composite"] < copies / STEPS + 0.5  # passes, and the products on top
    assert 1.0 + 1e-3 < r["merge"] < 1.5


def test_regions_tile_and_its_flop_ratio(sd15_narrow, conds):
    """A stack with a mask compares regions with the base model: two copies of the rows per call."""
    st = masked_stack()
    grid, report = compare(sd15_narrow, conds, st, "regions, base").args
    layout = grid_layout(["regions", "base"], 1, 64, 64)
    for col, method in enumerate(["regions", "base"]):
        expected, _ = alone(sd15_narrow, conds, st, method)
        x0, y0, x1, y1 = layout.tile_box(col)
        assert torch.allclose(grid[0, y0:y1, x0:x1], expected[0], atol=1e-5), method
    r = ratios(report)
    assert r == pytest.approx(measured_ratios(sd15_narrow, conds, st, ["regions"]) | {"base": 1.0}, abs=1e-3)
    assert r["regions"] > 2.0 + 1e-3  # two copies of the rows (the LoRA's and the rest's), and their products


def test_batch_of_two_and_larger_tiles(sd15_narrow, conds):
    st = stack((A, 1.0), (B, 0.7))
    grid = compare(sd15_narrow, conds, st, "composite, merge", size=16, batch=2).args[0]
    layout = grid_layout(["composite", "merge"], 2, 128, 128)
    assert tuple(grid.shape[1:3]) == (layout.height, layout.width)
    assert layout.font > grid_layout(["composite", "merge"], 2, 64, 64).font >= 12  # the text grows with the tiles
    for col, method in enumerate(["composite", "merge"]):
        expected, _ = alone(sd15_narrow, conds, st, method, size=16, batch=2)
        for row in range(2):
            x0, y0, x1, y1 = layout.tile_box(col, row)
            assert torch.allclose(grid[0, y0:y1, x0:x1], expected[row], atol=1e-5), (method, row)


class CallCounter:
    def __init__(self):
        self.calls = 0

    def __call__(self, executor, *args, **kwargs):
        self.calls += 1
        return executor(*args, **kwargs)


def counted(model):
    counter = CallCounter()
    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test-counter", counter)
    return m, counter


@pytest.mark.parametrize("methods,schedule,input,match,steps", [
    ("merge, nope", None, "methods", r"unknown method 'nope'.*Fix: use only base, merge, switch, composite, cmlora",
     STEPS),
    ("", None, "methods", r"lists no method.*Fix: type one or more of", STEPS),
    (" , ,", None, "methods", r"lists no method", STEPS),
    ("merge, composite, merge", None, "methods", r"lists merge more than once", STEPS),
    ("merge, cmlora", None, "schedule", r"methods lists cmlora, which needs a schedule.*Fix: connect a 'CMLoRA "
                                        r"Frequency Scheduler'.*or remove cmlora from methods", STEPS),
    ("merge, cmlora", "other", "schedule", r"the schedule was made for the LoRAs", STEPS),
    ("merge, cmlora", "same", "schedule", r"2 LoRAs need at least 2 steps, the run has 1", 1),  # not after merge ran
    ("base, regions, merge", None, "methods", r"has a mask, which only method regions honours, and methods also "
                                              r"lists merge.*Fix: list only regions \(and base\)", STEPS),
    ("merge, regions", None, "stack", r"method 'regions' needs at least one LoRA with a mask", STEPS),
])
def test_bad_input_is_refused_before_any_sampling(sd15_narrow, conds, methods, schedule, input, match, steps):
    model, counter = counted(sd15_narrow[0])
    st = masked_stack() if "has a mask" in match else two_loras()
    made_for = {"same": st, "other": stack((B, 1.0), (A, 1.0))}  # "other": the same LoRAs in another order
    sched = schedule_for(made_for[schedule]) if schedule else None
    with pytest.raises(CMLoRAError, match=match) as e:
        compare(sd15_narrow, conds, st, methods, sched, model=model, steps=steps)
    assert e.value.node == NODE and e.value.input == input
    assert str(e.value).startswith(f"[{NODE}] input '{input}'")
    assert counter.calls == 0  # refused before the first method sampled


def test_unused_schedule_is_named_in_the_report(sd15_narrow, conds):
    st = stack((A, 1.0), (B, 1.0))
    report = compare(sd15_narrow, conds, st, "merge", schedule_for(st)).args[1]
    assert "a schedule is connected but methods does not list cmlora" in report


def test_the_model_is_left_as_it_was_after_a_run_and_after_a_failed_one(sd15_narrow, conds):
    model = sd15_narrow[0]
    before = ksample(model, conds, steps=3)
    weights = digests(model.model.diffusion_model.state_dict())
    st = two_loras()
    compare(sd15_narrow, conds, st, "switch, merge, composite, cmlora", schedule_for(st))
    assert torch.equal(before, ksample(model, conds, steps=3))

    # a run stopped in its second method (switch, with a LoRA folded into the weights at the time)
    stopping, counter = counted(model)

    class Interrupt:
        def __call__(self, executor, *args, **kwargs):
            if counter.calls == STEPS + 2:  # merge's calls (one per step), then switch's second step
                comfy.model_management.interrupt_current_processing(True)
            return executor(*args, **kwargs)

    stopping.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test-interrupt", Interrupt())
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            compare(sd15_narrow, conds, st, "merge, switch, composite", model=stopping)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert counter.calls == STEPS + 2  # it did stop inside switch's run
    assert torch.equal(before, ksample(model, conds, steps=3))
    assert digests(model.model.diffusion_model.state_dict()) == weights
    assert not stopping.wrappers.get(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {}).keys() - {
        "test-counter", "test-interrupt"}  # nothing of the node's was left on the model it was given


def test_the_seconds_are_the_sampling_alone(sd15_narrow, conds, monkeypatch):
    """Loading the model (and patching it in) and decoding each take an extra second here; no label
    counts them, so the first column does not pay for loading the others share."""
    import time

    load, decode = comfy.model_management.load_models_gpu, sd15_narrow[2].decode
    monkeypatch.setattr(comfy.model_management, "load_models_gpu", lambda *a, **k: (time.sleep(1.0), load(*a, **k))[1])
    monkeypatch.setattr(sd15_narrow[2], "decode", lambda *a, **k: (time.sleep(1.0), decode(*a, **k))[1])
    _, report = compare(sd15_narrow, conds, two_loras(), "merge, switch", steps=1).args
    seconds = {m: float(s) for m, s in re.findall(r"^(\w+): ([\d.]+) s ", report, re.M)}
    assert set(seconds) == {"merge", "switch"} and all(s < 1.0 for s in seconds.values()), seconds
