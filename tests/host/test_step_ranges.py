"""Per-LoRA ranges and strength curves, on the real host: every method against the run rebuilt
step by step from the host's own LoraLoader (a LoRA on its steps, the base model off them).

Ranges are measured on the noise level, as the host's ControlNet start/end percent are: with the
normal scheduler of these tests, step i of an N-step run starts at place i / (N - 1)."""
from __future__ import annotations

import math

import pytest
import torch

import comfy.sample
import comfy.samplers
import nodes as host_nodes
from _util import apply, ksample, lora_loader, once, stack, stepwise_reference

from comfyui_cmlora.cmlora_core.errors import CMLoRAError
from comfyui_cmlora.nodes.apply_nodes import ApplyNode
from comfyui_cmlora.nodes.clora_nodes import AttentionMasker
from comfyui_cmlora.nodes.cmlora_nodes import SchedulerNode
from comfyui_cmlora.nodes.runtime import runtime_of

A, B = "test_kohya_narrow.safetensors", "test_locon_narrow.safetensors"
STEPS = 6


def entry(name, strength=1.0, **kw):
    return {"lora_name": name, "strength_model": strength, **kw}


def patched(model, st, method, interval=1):
    if method != "cmlora":
        return apply(model, st, method, interval)
    sched = SchedulerNode.execute(
        stack=st, mode="offline", switch_interval=1, cache="deep", refresh="uniform", refresh_interval=2,
        h_to_l_fraction=0.5, online_threshold=0.5, w_dom="constant", dominant_full=True, preview_steps=8).args[0]
    return ApplyNode.execute(model=model, stack=st, method="cmlora", switch_interval=1, schedule=sched).args[0]


@pytest.mark.parametrize("method", ["merge", "switch", "composite"])
def test_lora_on_the_first_half_equals_lora_loader_then_the_base_model(sd15_narrow, conds, method):
    model = sd15_narrow[0]
    ours_model = patched(model, stack(entry(A, 0.9, end_at=0.5)), method)
    ours = ksample(ours_model, conds, steps=STEPS)
    # the references, computed once for the three methods
    on = lora_loader(model, (A, 0.9))
    expected = once(("first half", A, 0.9), lambda: stepwise_reference([on] * 3 + [model] * 3, conds, "euler", STEPS))
    assert torch.allclose(ours, expected, atol=1e-4), (ours - expected).abs().max()
    # not the LoRA throughout, not the base model throughout
    assert not torch.allclose(ours, once(("throughout", A, 0.9), lambda: ksample(on, conds, steps=STEPS)), atol=1e-3)
    assert not torch.allclose(ours, once(("base", STEPS), lambda: ksample(model, conds, steps=STEPS)), atol=1e-3)
    trace = runtime_of(ours_model).last_trace
    assert [trace.strengths[i][0] for i in range(STEPS)] == [0.9, 0.9, 0.9, 0.0, 0.0, 0.0]
    assert "steps 0-2" in runtime_of(ours_model).report(trace)


@pytest.mark.parametrize("method", ["merge", "composite", "switch"])
@pytest.mark.parametrize("curve", ["linear", "smooth"])
def test_strength_curve_equals_lora_loader_at_each_steps_strength(sd15_narrow, conds, method, curve):
    model = sd15_narrow[0]
    st = stack(entry(A, 1.2, strength_curve=curve, strength_model_end=0.2, start_at=1 / 6))
    ours = ksample(patched(model, st, method), conds, steps=STEPS)
    # by hand: the normal scheduler starts step i at place p = i / 5 on the noise level; the range [1/6, 1)
    # holds steps 1-5, and the curve runs from 1.2 at p = 1/6 to 0.2 at p = 1
    ease = (lambda t: t) if curve == "linear" else (lambda t: 0.5 - 0.5 * math.cos(math.pi * t))
    strengths = [0.0] + [1.2 - 1.0 * ease((i / 5 - 1 / 6) / (5 / 6)) for i in range(1, STEPS)]
    assert abs(strengths[5] - 0.2) < 1e-9
    models = [model if s == 0.0 else lora_loader(model, (A, s)) for s in strengths]
    # the references, computed once for the three methods
    expected = once(("curve", curve, A, 1.2, 0.2), lambda: stepwise_reference(models, conds, "euler", STEPS))
    assert torch.allclose(ours, expected, atol=1e-4), (ours - expected).abs().max()
    constant = once(("from step 1", A, 1.2), lambda: stepwise_reference(
        [model] + [lora_loader(model, (A, 1.2))] * 5, conds, "euler", STEPS))
    assert not torch.allclose(ours, constant, atol=1e-3)


def test_cmlora_composes_only_the_loras_on_at_each_step(sd15_narrow, conds):
    """A on the first half, B on the second: at every step one LoRA is on, so CMLoRA leads with it at
    weight 1 and runs no pass of the other; the image is LoraLoader A's for three steps, then B's."""
    model = sd15_narrow[0]
    p = patched(model, stack(entry(A, end_at=0.5), entry(B, 0.8, start_at=0.5)), "cmlora")
    ours = ksample(p, conds, steps=STEPS)
    trace = runtime_of(p).last_trace
    assert [trace.plans[i].dominant for i in range(STEPS)] == [0, 0, 0, 1, 1, 1]
    assert (trace.full_passes, trace.shallow_passes) == (trace.model_calls, 0)
    a, b = lora_loader(model, (A, 1.0)), lora_loader(model, (B, 0.8))
    expected = once(("A then B", A, B, 0.8), lambda: stepwise_reference([a] * 3 + [b] * 3, conds, "euler", STEPS))
    assert torch.allclose(ours, expected, atol=1e-4), (ours - expected).abs().max()


def test_a_fade_in_from_zero_is_applied(sd15_narrow, conds):
    """Strength 0 ramping linearly to 1 (strength_model 0 and strength_model_end 1): on at every step
    but the first, at 0.2, 0.4, 0.6, 0.8 and 1."""
    model = sd15_narrow[0]
    p = patched(model, stack(entry(A, 0.0, strength_curve="linear", strength_model_end=1.0)), "merge")
    ours = ksample(p, conds, steps=STEPS)
    models = [model] + [lora_loader(model, (A, s)) for s in (0.2, 0.4, 0.6, 0.8, 1.0)]
    expected = stepwise_reference(models, conds, "euler", STEPS)
    assert torch.allclose(ours, expected, atol=1e-4), (ours - expected).abs().max()


def test_switch_gives_a_lora_that_comes_on_whole_turns(sd15_narrow, conds):
    """A throughout, B on the second half of 10 steps, interval 3: turns start at steps 0, 3, 6 and 9;
    B is off at 3, so its first turn is 6-8, whole: A A A A A A B B B A."""
    model = sd15_narrow[0]
    p = patched(model, stack(entry(A), entry(B, 0.8, start_at=0.5)), "switch", interval=3)
    ours = ksample(p, conds, steps=10)
    trace = runtime_of(p).last_trace
    assert [trace.active[i] for i in range(10)] == [0] * 6 + [1] * 3 + [0]
    a, b = lora_loader(model, (A, 1.0)), lora_loader(model, (B, 0.8))
    expected = stepwise_reference([a] * 6 + [b] * 3 + [a], conds, "euler", 10)
    assert torch.allclose(ours, expected, atol=1e-4), (ours - expected).abs().max()


def test_switch_rotates_through_the_loras_on_at_each_step(sd15_narrow, conds):
    """A on the first half, B on the second: switch with interval 1 gives A, A, A, B, B, B."""
    model = sd15_narrow[0]
    st = stack(entry(A, end_at=0.5), entry(B, 0.8, start_at=0.5))
    p = patched(model, st, "switch", interval=1)
    ours = ksample(p, conds, steps=STEPS)
    trace = runtime_of(p).last_trace
    assert [trace.active[i] for i in range(STEPS)] == [0, 0, 0, 1, 1, 1]
    a, b = lora_loader(model, (A, 1.0)), lora_loader(model, (B, 0.8))
    expected = stepwise_reference([a] * 3 + [b] * 3, conds, "euler", STEPS)
    assert torch.allclose(ours, expected, atol=1e-4), (ours - expected).abs().max()


def test_two_loras_merged_with_ranges_equal_lora_loader_chains_per_step(sd15_narrow, conds):
    model = sd15_narrow[0]
    st = stack(entry(A, 0.7, end_at=2 / 3), entry(B, 0.9, start_at=1 / 3))
    ours = ksample(patched(model, st, "merge"), conds, steps=STEPS)
    a, ab, b = lora_loader(model, (A, 0.7)), lora_loader(model, (A, 0.7), (B, 0.9)), lora_loader(model, (B, 0.9))
    expected = stepwise_reference([a, a, ab, ab, b, b], conds, "euler", STEPS)
    assert torch.allclose(ours, expected, atol=1e-4), (ours - expected).abs().max()


def test_plain_stack_keeps_the_hosts_merge(sd15_narrow):
    """Without a range or curve, merge is the host's own patches (no runtime), as before."""
    p = apply(sd15_narrow[0], stack(entry(A)), "merge")
    assert runtime_of(p) is None and len(p.patches) > 0


def test_a_range_with_no_step_is_reported_and_bad_ranges_are_refused(sd15_narrow, conds):
    model = sd15_narrow[0]
    p = patched(model, stack(entry(A, start_at=0.9, end_at=0.95)), "composite")
    out = ksample(p, conds, steps=4)  # on no step of a 4-step run: the base model, said in the report
    assert torch.allclose(out, ksample(model, conds, steps=4), atol=1e-5)
    assert "on no step of this run" in runtime_of(p).report(runtime_of(p).last_trace)
    with pytest.raises(CMLoRAError) as e:
        stack(entry(A, start_at=0.6, end_at=0.4))
    assert "CMLoRA LoRA Stack" in str(e.value) and "end_at" in str(e.value)
    with pytest.raises(CMLoRAError) as e:
        stack(entry(A, strength_curve="zigzag"))
    assert "strength_curve" in str(e.value)


def _advanced(model, conds, steps, start, end, leftover, latent_in=None, seed=5):
    """One KSamplerAdvanced pass, as the node runs it (euler, normal)."""
    pos, neg = conds
    lat = latent_in if latent_in is not None else {"samples": torch.zeros(1, 4, 8, 8)}
    return host_nodes.KSamplerAdvanced().sample(
        model, "enable" if latent_in is None else "disable", seed, steps, 5.0, "euler", "normal", pos, neg, lat,
        start_at_step=start, end_at_step=end, return_with_leftover_noise="enable" if leftover else "disable")[0]


def _one_and_two_passes(model, conds, steps=8, cut=3):
    one = _advanced(model, conds, steps, 0, 10000, False)["samples"]
    first = _advanced(model, conds, steps, 0, cut, True)
    two = _advanced(model, conds, steps, cut, 10000, False, latent_in=first)["samples"]
    return one, two


def _masked_left():
    m = torch.zeros(1, 64, 64)
    m[..., :32] = 1.0
    return m


@pytest.mark.parametrize("method", ["merge", "composite", "switch", "regions", "cmlora"])
def test_two_ksampler_advanced_passes_equal_one_run(sd15_narrow, conds, method):
    """A refiner-style split (steps 0-2 with the noise left, then 3-7) samples what one run does: ranges
    and curves are measured on the noise level and switch's turns carry on into the second pass. The
    cut falls inside A's range and inside a switch turn, so counting steps per pass would differ. CMLoRA
    (refresh every 2 steps, low-frequency phase from step 4) finds the run's 8 steps from the first pass's
    noise levels and hands its planner and deep features on: step 3 runs B shallow around the feature of
    step 2, and the dominant role moves to the L LoRA at step 4, in the second pass."""
    model = sd15_narrow[0]
    plain_one, plain_two = once(("plain split", 8, 3), lambda: _one_and_two_passes(model, conds))
    own = (plain_one - plain_two).abs().max().item()  # the host's own difference between the two ways
    first = {"lora_name": A, "strength_model": 1.0, "end_at": 0.6}
    if method == "regions":
        first.update(mask=_masked_left(), mask_feather=0)
    if method == "cmlora":
        first.update(category="character")
    st = stack(first, entry(B, 0.9, start_at=0.2, strength_curve="linear", strength_model_end=0.3,
                            category="background"))
    p = patched(model, st, method, interval=2)
    ours_one, ours_two = _one_and_two_passes(p, conds)
    assert (ours_one - ours_two).abs().max().item() <= own + 1e-4, ((ours_one - ours_two).abs().max(), own)
    assert not torch.allclose(ours_one, plain_one, atol=1e-3)  # the LoRAs did act
    if method == "cmlora":
        second = runtime_of(p).last_trace  # the second pass: steps 3-7 of the run
        assert sorted(second.plans) == list(range(3, 8))
        assert second.plans[3].passes == ["full", "shallow"] and [second.plans[s].dominant for s in (3, 4)] == [0, 1]


def test_cmlora_two_passes_with_a_sampler_that_drops_a_noise_level(sd15_narrow, conds):
    """dpm_2 (like uni_pc): KSampler samples its T steps on a T + 1-step schedule less the next-to-last
    level, so the first pass begins as a run of T + 1 steps would; the run's count is T, and two passes still
    equal one run. (On karras: a split normal run also fits sgm_uniform's run of one step fewer.)"""
    model = sd15_narrow[0]
    p = patched(model, stack(entry(A, category="character"), entry(B, 0.9, category="background")), "cmlora")

    def run(m, start, end, leftover, latent_in=None):
        pos, neg = conds
        lat = latent_in if latent_in is not None else {"samples": torch.zeros(1, 4, 8, 8)}
        return host_nodes.KSamplerAdvanced().sample(
            m, "enable" if latent_in is None else "disable", 5, 8, 5.0, "dpm_2", "karras", pos, neg, lat,
            start_at_step=start, end_at_step=end, return_with_leftover_noise="enable" if leftover else "disable")[0]

    plain = run(model, 0, 10000, False)["samples"]
    own = (plain - run(model, 3, 10000, False, run(model, 0, 3, True))["samples"]).abs().max().item()
    one = run(p, 0, 10000, False)["samples"]
    two = run(p, 3, 10000, False, run(p, 0, 3, True))["samples"]
    assert (one - two).abs().max().item() <= own + 1e-4, ((one - two).abs().max(), own)
    assert sorted(runtime_of(p).last_trace.plans) == list(range(3, 8))


def test_a_second_pass_continues_the_first_pass_it_was_given(sd15_narrow, conds):
    """Two split runs of other seeds, both first passes sampled before either second (two workflows
    queued together): each second pass continues the first pass whose latent it is given — CMLoRA's planner
    and deep features from that pass, not from the latest one stopping at the same noise level."""
    model = sd15_narrow[0]
    plain_one, plain_two = once(("plain split", 8, 3), lambda: _one_and_two_passes(model, conds))
    own = (plain_one - plain_two).abs().max().item()
    p = patched(model, stack(entry(A, category="character"), entry(B, 0.9, category="background")), "cmlora")
    one = _advanced(p, conds, 8, 0, 10000, False)["samples"]
    first = _advanced(p, conds, 8, 0, 3, True)
    _advanced(p, conds, 8, 0, 3, True, seed=6)  # the other workflow's first pass, stopping at the same level
    two = _advanced(p, conds, 8, 3, 10000, False, latent_in=first)["samples"]
    assert (one - two).abs().max().item() <= own + 1e-4, ((one - two).abs().max(), own)
    assert runtime_of(p).last_trace.shallow_passes > 0  # the carried features were used


def test_clora_two_passes_equal_one_run(sd15_narrow, conds):
    """CLoRA's latent updates belong to the whole run's steps (steps 0-4 of 10, one extra iteration at
    steps 0, 1 and 2): split at step 4, the second pass updates its first step once, as one run does."""
    model, clip, _ = sd15_narrow
    st = stack({"lora_name": A, "category": "character", "concept": "cat"},
               {"lora_name": B, "category": "object", "concept": "dog"})
    p, positive = AttentionMasker.execute(model=model, clip=clip, stack=st, prompt="a cat and a dog", temperature=0.5,
                                          step_size=5.0, stop_fraction=0.5, extra_iterations=1, mask_threshold=0.4,
                                          attention="conditional", style_scope="global").args
    run_conds = (positive, conds[1])
    plain_one, plain_two = once(("plain split", 10, 4), lambda: _one_and_two_passes(model, conds, 10, 4))
    own = (plain_one - plain_two).abs().max().item()
    one, two = _one_and_two_passes(p, run_conds, 10, 4)
    assert (one - two).abs().max().item() <= own + 1e-4, ((one - two).abs().max(), own)
    runs = runtime_of(p).runs
    assert [sorted(r.losses) for r in runs[-2:]] == [[0, 1, 2, 3], [0]]  # the second pass's step 0 is step 4
    assert [len(v) for v in runs[-2].losses.values()] == [2, 2, 2, 1] and len(runs[-1].losses[0]) == 1


def test_cmlora_and_clora_refuse_a_pass_whose_run_is_unknown(sd15_narrow, conds):
    """A pass that leaves noise is planned as part of the runs it can begin: none (a hand-made schedule) or
    several that plan it differently (8 steps of the normal scheduler begin like 7 of sgm_uniform, and
    CLoRA's extra iterations fall on step 2 of 8 but step 1 of 7) is a clear error, and the model as it was."""
    model, clip, _ = sd15_narrow
    cm = patched(model, stack(entry(A), entry(B, 0.8)), "cmlora")
    cl, positive = AttentionMasker.execute(model=model, clip=clip, stack=stack(
        {"lora_name": A, "category": "character", "concept": "cat"},
        {"lora_name": B, "category": "object", "concept": "dog"}), prompt="a cat and a dog", temperature=0.5,
        step_size=5.0, stop_fraction=0.5, extra_iterations=1, mask_threshold=0.4, attention="conditional",
        style_scope="global").args
    before = once(("base advanced", 8), lambda: _advanced(model, conds, 8, 0, 10000, False)["samples"])
    sigmas = torch.tensor([14.6, 6.0, 2.5, 1.1])  # no scheduler of the host begins so
    lat = torch.zeros(1, 4, 8, 8)
    for p, (pos, neg) in ((cm, conds), (cl, (positive, conds[1]))):
        with pytest.raises(CMLoRAError) as e:
            comfy.sample.sample_custom(p, comfy.sample.prepare_noise(lat, 5), 5.0, comfy.samplers.sampler_object("euler"),
                                       sigmas, pos, neg, lat, seed=5)
        assert "not the first steps of a run" in str(e.value) and "KSamplerAdvanced" in str(e.value)
    with pytest.raises(CMLoRAError) as e:
        _advanced(cl, (positive, conds[1]), 8, 0, 3, True)
    assert "runs of 7 and 8 steps" in str(e.value) and "another step" in str(e.value)
    assert torch.allclose(_advanced(model, conds, 8, 0, 10000, False)["samples"], before, atol=1e-6)
