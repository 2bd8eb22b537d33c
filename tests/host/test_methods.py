"""Merge, Switch and Composite on the real host, against ComfyUI's own LoraLoader."""
from __future__ import annotations

import pytest
import torch

import comfy.model_management
import comfy.sample
import nodes as host_nodes

from _util import Recorder, apply, diffusion_out, digests, ksample, lora_loader, stack, stepwise_reference

from comfyui_cmlora.cmlora_core.steps import switch_active
from comfyui_cmlora.nodes.runtime import runtime_of

A, B, C = "test_kohya_narrow.safetensors", "test_locon_narrow.safetensors", "test_peft_narrow.safetensors"


def test_merge_equals_chained_lora_loader(sd15_narrow, conds):
    model = sd15_narrow[0]
    ours = ksample(apply(model, stack((A, 0.8), (B, 0.6)), "merge"), conds)
    ref = ksample(lora_loader(model, (A, 0.8), (B, 0.6)), conds)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    # and the LoRAs really change the result
    assert not torch.allclose(ours, ksample(model, conds), atol=1e-3)


def test_switch_single_lora_equals_lora_loader(sd15_narrow, conds):
    model = sd15_narrow[0]
    ours = ksample(apply(model, stack((A, 0.9)), "switch", interval=2), conds, steps=4)
    ref = ksample(lora_loader(model, (A, 0.9)), conds, steps=4)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def _check_switch_calls(model, rec, loras, strengths, interval, sample_sigmas):
    """Every recorded call equals the active LoRA's LoraLoader model on the same inputs."""
    refs = [lora_loader(model, (n, s)) for n, s in zip(loras, strengths)]
    points = sample_sigmas[:-1]
    for call in rec.calls:
        step = max(i for i, s in enumerate(points) if s >= call["sigma"] * (1 - 1e-5))
        k = switch_active(step, interval, len(loras))
        expected = diffusion_out(refs[k], call)
        assert torch.allclose(call["out"], expected, atol=1e-4), (step, k, (call["out"] - expected).abs().max())
        others = [diffusion_out(refs[j], call) for j in range(len(loras)) if j != k]
        assert all(not torch.allclose(call["out"], o, atol=1e-3) for o in others)


def test_switch_follows_rule_at_every_step(sd15_narrow, conds):
    model = sd15_narrow[0]
    loras, strengths, interval, steps = [A, B, C], [1.0, 0.8, 1.0], 2, 7
    patched = apply(model, stack(*zip(loras, strengths)), "switch", interval=interval)
    rec = Recorder()
    patched = rec.attach(patched)  # a clone: it has a runtime of its own, which records this run
    ksample(patched, conds, steps=steps)
    runtime = runtime_of(patched)
    trace = runtime.last_trace
    assert [trace.active[i] for i in range(steps)] == [switch_active(i, interval, 3) for i in range(steps)] \
        == [0, 0, 1, 1, 2, 2, 0]
    assert trace.status == "finished"
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps).tolist()
    _check_switch_calls(model, rec, loras, strengths, interval, sigmas)


def test_switch_under_ksampler_advanced_start_step(sd15_narrow, conds):
    """The step index counts the steps of the run's (sliced) schedule."""
    model = sd15_narrow[0]
    loras, interval = [A, B], 1
    patched = apply(model, stack((A, 1.0), (B, 1.0)), "switch", interval=interval)
    rec = Recorder()
    patched = rec.attach(patched)  # a clone: it has a runtime of its own, which records this run
    pos, neg = conds
    lat = {"samples": torch.zeros(1, 4, 8, 8)}
    host_nodes.KSamplerAdvanced().sample(patched, "enable", 3, 6, 5.0, "euler", "normal", pos, neg, lat,
                                         start_at_step=2, end_at_step=5, return_with_leftover_noise="disable")
    trace = runtime_of(patched).last_trace
    assert trace.steps == 3 and [trace.active[i] for i in range(3)] == [0, 1, 0]
    full = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 6)
    sliced = full[2:6].tolist()
    _check_switch_calls(model, rec, loras, [1.0, 1.0], interval, sliced)


def test_switch_multi_evaluation_sampler(sd15_narrow, conds, sampler="heun"):
    """Heun evaluates twice per step, the second time at the next schedule point; both evaluations
    of a step use that step's LoRA. (Heun++ looks two points ahead, which a one-step reference run
    cannot reproduce; its evaluation order is checked in tests/core.)"""
    model = sd15_narrow[0]
    loras, interval, steps = [A, B], 1, 4
    patched = apply(model, stack((A, 1.0), (B, 1.0)), "switch", interval=interval)
    ours = ksample(patched, conds, steps=steps, sampler=sampler)
    trace = runtime_of(patched).last_trace
    assert trace.model_calls > steps  # really several evaluations per step
    assert [trace.active[i] for i in range(steps)] == [0, 1, 0, 1]
    refs = [lora_loader(model, (n, 1.0)) for n in loras]
    expected = stepwise_reference([refs[switch_active(i, interval, 2)] for i in range(steps)], conds, sampler, steps)
    assert torch.allclose(ours, expected, atol=1e-4), (ours - expected).abs().max()
    # the rule "by sigma" (the corrector at sigma[i+1] taken as step i+1's) gives another image
    wrong = [refs[switch_active(min(i + 1, steps - 1), interval, 2)] for i in range(steps)]
    assert not torch.allclose(ours, stepwise_reference(wrong, conds, sampler, steps), atol=1e-3)


@pytest.mark.parametrize("cfg,batch", [(5.0, 1), (1.0, 1), (5.0, 2)])
def test_composite_is_mean_of_lora_loader_predictions_in_one_call(sd15_narrow, conds, cfg, batch):
    model = sd15_narrow[0]
    loras, strengths = [A, B, C], [1.0, 0.7, 0.9]
    outer = Recorder()
    inner = Recorder()
    patched = apply(outer.attach(model, "outer"), stack(*zip(loras, strengths)), "composite")
    ksample(inner.attach(patched, "inner"), conds, steps=3, cfg=cfg, batch=batch)
    # one diffusion-model call per host chunk, holding every LoRA's rows
    assert len(inner.calls) == len(outer.calls)
    for o, i in zip(outer.calls, inner.calls):
        assert i["x"].shape[0] == len(loras) * o["x"].shape[0]
        assert o["x"].shape[0] == batch * len(o["cond_or_uncond"])
        if cfg == 1.0:
            assert o["cond_or_uncond"] == [0]  # the host skips uncond; mean of conditional predictions
    refs = [lora_loader(model, (n, s)) for n, s in zip(loras, strengths)]
    for call in outer.calls:
        expected = torch.stack([diffusion_out(r, call) for r in refs]).mean(0)
        assert torch.allclose(call["out"], expected, atol=1e-4), (call["out"] - expected).abs().max()


def test_base_model_unaffected_and_bit_identical_after_runs(sd15_narrow, conds):
    model = sd15_narrow[0]
    before = ksample(model, conds, steps=3)
    sd_before = digests(model.model.diffusion_model.state_dict())
    for method in ("switch", "composite", "merge"):
        ksample(apply(model, stack((A, 1.0), (B, 1.0)), method, interval=1), conds, steps=3)
        after = ksample(model, conds, steps=3)
        assert torch.equal(before, after), method
    assert digests(model.model.diffusion_model.state_dict()) == sd_before


@pytest.mark.parametrize("method", ["switch", "composite"])
def test_interrupted_run_leaves_model_as_it_was(sd15_narrow, conds, method):
    model = sd15_narrow[0]
    before = ksample(model, conds, steps=3)
    patched = apply(model, stack((A, 1.0), (B, 1.0)), method, interval=1)

    def interrupt(step, *args):
        if step == 1:
            comfy.model_management.interrupt_current_processing(True)

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        ksample(patched, conds, steps=4, callback=interrupt)
    comfy.model_management.interrupt_current_processing(False)
    assert runtime_of(patched).last_trace.status.startswith("stopped")
    assert torch.equal(before, ksample(model, conds, steps=3))
    # and the patched model runs again normally afterwards
    again = ksample(patched, conds, steps=3)
    assert torch.isfinite(again).all()


def test_sampler_custom_advanced_runs_the_same_composite(sd15_narrow, conds):
    """SamplerCustomAdvanced (guider + sigmas) gives what KSampler gives, same seed."""
    from comfy_extras import nodes_custom_sampler as cs

    model = sd15_narrow[0]
    patched = apply(model, stack((A, 1.0), (B, 0.5)), "composite")
    pos, neg = conds
    guider = cs.CFGGuider.execute(patched, pos, neg, 5.0).args[0]
    sigmas = cs.BasicScheduler.execute(patched, "normal", 3, 1.0).args[0]
    sampler = cs.KSamplerSelect.execute("euler").args[0]
    noise = cs.RandomNoise.execute(1).args[0]
    out = cs.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, {"samples": torch.zeros(1, 4, 8, 8)}).args[0]
    ref = ksample(patched, conds, steps=3, seed=1)
    assert torch.allclose(out["samples"], ref, atol=1e-5)
    assert runtime_of(patched).last_trace.status == "finished"
