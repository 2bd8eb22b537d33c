"""How the pack's nodes combine with the host's LoRA loader, with each other and with other packs.

The rules, in plain words:

1. A host LoraLoaderModelOnly put before CMLoRA Apply is part of every row: LoraLoader(A) then
   Apply composite [B, C] predicts, on every model call, the mean of what the host's own chains
   LoraLoader(A, B) and LoraLoader(A, C) predict; LoraLoader(A) then Apply switch [B, C] predicts,
   at every step, what the chain LoraLoader(A, active LoRA) predicts.
2. A LoraLoaderModelOnly put after CMLoRA Apply is part of every row too: Apply composite [B, C]
   then LoraLoader(A) gives what rule 1 gives (the same for switch).
3. CMLoRA Apply with method merge, before or after a composing Apply, is part of every row the
   same way: Apply merge [A] then Apply composite [B, C] (or the other order) gives rule 1's result.
4. Only one composing node per model: a composing node (CMLoRA Apply with switch, composite or
   cmlora, or the CLoRA Attention Masker) fed a model that already carries a composing runtime is
   refused with a CMLoRAError that starts with the later node's name in brackets and names the
   earlier node and says the model "already" composes. The refusal changes nothing: the earlier
   model samples as before and the base model is untouched.
5. Other packs' wrappers and attachments on the model survive CMLoRA Apply: a foreign
   DIFFUSION_MODEL wrapper runs on every diffusion-model call, its attachment stays on the output,
   the result is the same as without it, and every wrapper key the pack adds starts with
   "comfyui_cmlora" (so it cannot collide with another pack's key).

The references are always built from the host's own LoraLoaderModelOnly, never from the pack.
"""
from __future__ import annotations

import re

import pytest
import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.samplers

from _util import Recorder, apply, digests, ksample, lora_loader, masks_only, stack

from comfyui_cmlora.cmlora_core.errors import CMLoRAError

A, B, C = "test_kohya_narrow.safetensors", "test_locon_narrow.safetensors", "test_peft_narrow.safetensors"
SA, SB, SC = 0.9, 0.8, 1.0
STEPS = 2
ATOL_CALL = 1e-4  # per model call, as test_methods.py
ATOL_SAMPLE = 1e-5  # final latents, as test_methods.py
PACK_PREFIX = "comfyui_cmlora"


# ----------------------------------------------------------------------------- references
def _outs(model, calls):
    """The diffusion model of ``model`` (a host LoraLoader chain) on every recorded call, like
    ``_util.diffusion_out`` but loading the model once and running all calls as one batch."""
    with torch.no_grad():
        comfy.model_management.load_models_gpu([model])
    dm = model.model.diffusion_model
    sizes = [c["x"].shape[0] for c in calls]
    with torch.no_grad():
        kwargs = {} if calls[0]["y"] is None else {"y": torch.cat([c["y"] for c in calls])}
        out = dm(torch.cat([c["x"] for c in calls]), torch.cat([c["t"] for c in calls]),
                 context=torch.cat([c["context"] for c in calls]), transformer_options={}, **kwargs)
    return list(out.split(sizes))


def _mean_outs(models, calls):
    per_model = [_outs(m, calls) for m in models]
    return [torch.stack(outs).mean(0) for outs in zip(*per_model)]


def _check_composite_with_a(model, rec):
    """Every recorded (outermost) call is the mean of LoraLoader (A, B) and (A, C) on its inputs."""
    assert rec.calls, "the model was never called"
    with_a = [lora_loader(model, (A, SA), (B, SB)), lora_loader(model, (A, SA), (C, SC))]
    for call, expected in zip(rec.calls, _mean_outs(with_a, rec.calls)):
        assert call["out"].shape == expected.shape
        assert torch.allclose(call["out"], expected, atol=ATOL_CALL), (call["out"] - expected).abs().max()
    # A really is visible: the mean without A is far from what was predicted
    missing = _mean_outs([lora_loader(model, (B, SB)), lora_loader(model, (C, SC))], rec.calls[:1])[0]
    assert not torch.allclose(rec.calls[0]["out"], missing, atol=1e-3)


def _switch_active(step, interval, n):
    """The switch rule, written out here: each LoRA for ``interval`` steps, in stack order, cycling."""
    return (step // interval) % n


def _check_switch_with_a(model, rec, interval, steps):
    """Every recorded call is LoraLoader (A, active LoRA) on its inputs, not (A, other) nor (active) alone."""
    calls = rec.calls
    assert calls, "the model was never called"
    with_a = [_outs(lora_loader(model, (A, SA), (B, SB)), calls), _outs(lora_loader(model, (A, SA), (C, SC)), calls)]
    alone_first = _outs(lora_loader(model, (B, SB)), calls[:1])[0]  # LoRA B without A, on the first call
    points = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps).tolist()[:-1]
    seen = set()
    for n, call in enumerate(calls):
        step = max(i for i, s in enumerate(points) if s >= call["sigma"] * (1 - 1e-5))
        k = _switch_active(step, interval, 2)
        seen.add(k)
        expected = with_a[k][n]
        assert torch.allclose(call["out"], expected, atol=ATOL_CALL), (step, k, (call["out"] - expected).abs().max())
        assert not torch.allclose(call["out"], with_a[1 - k][n], atol=1e-3), (step, k)
    assert seen == {0, 1}  # both LoRAs were active at some step
    # A really is visible: the first call (B active) is far from LoraLoader B without A
    assert _switch_active(0, interval, 2) == 0
    assert not torch.allclose(calls[0]["out"], alone_first, atol=1e-3)


# ----------------------------------------------------------------------------- rule 1
def test_host_lora_before_composite_is_in_every_row(sd15_narrow, conds):
    model = sd15_narrow[0]
    rec = Recorder()
    patched = apply(rec.attach(lora_loader(model, (A, SA))), stack((B, SB), (C, SC)), "composite")
    ksample(patched, conds, steps=STEPS)
    _check_composite_with_a(model, rec)


def test_host_lora_before_switch_is_in_every_step(sd15_narrow, conds):
    model = sd15_narrow[0]
    rec = Recorder()
    patched = apply(rec.attach(lora_loader(model, (A, SA))), stack((B, SB), (C, SC)), "switch", interval=1)
    ksample(patched, conds, steps=STEPS)
    _check_switch_with_a(model, rec, 1, STEPS)


# ----------------------------------------------------------------------------- rule 2
def test_host_lora_after_composite_is_in_every_row(sd15_narrow, conds):
    model = sd15_narrow[0]
    rec = Recorder()
    patched = lora_loader(apply(rec.attach(model), stack((B, SB), (C, SC)), "composite"), (A, SA))
    ksample(patched, conds, steps=STEPS)
    _check_composite_with_a(model, rec)


def test_host_lora_after_switch_is_in_every_step(sd15_narrow, conds):
    model = sd15_narrow[0]
    rec = Recorder()
    patched = lora_loader(apply(rec.attach(model), stack((B, SB), (C, SC)), "switch", interval=1), (A, SA))
    ksample(patched, conds, steps=STEPS)
    _check_switch_with_a(model, rec, 1, STEPS)


# ----------------------------------------------------------------------------- rule 3
@pytest.mark.parametrize("merge_first", [True, False], ids=["merge-then-composite", "composite-then-merge"])
def test_apply_merge_with_composite_is_in_every_row(sd15_narrow, conds, merge_first):
    model = sd15_narrow[0]
    rec = Recorder()
    m = rec.attach(model)
    if merge_first:
        patched = apply(apply(m, stack((A, SA)), "merge"), stack((B, SB), (C, SC)), "composite")
    else:
        patched = apply(apply(m, stack((B, SB), (C, SC)), "composite"), stack((A, SA)), "merge")
    ksample(patched, conds, steps=STEPS)
    _check_composite_with_a(model, rec)


# ----------------------------------------------------------------------------- rule 4
PROMPT = "a photo of a cat and a dog in a garden"


def _negative(clip):
    return clip.encode_from_tokens_scheduled(clip.tokenize("blurry"))


def _earlier(kind, model, clip, conds):
    """(model with a composing runtime, the conds to sample it with)."""
    if kind == "composite":
        return apply(model, stack((B, SB), (C, SC)), "composite"), conds
    if kind == "switch":
        return apply(model, stack((B, SB), (C, SC)), "switch", interval=1), conds
    masked, positive = masks_only(model, clip, A, C, prompt=PROMPT, triggers=("sks", "zwx"))
    return masked, (positive, _negative(clip))


def _later(kind, model, clip):
    if kind == "switch":
        return apply(model, stack((A, SA), (B, SB)), "switch", interval=1)
    if kind == "composite":
        return apply(model, stack((A, SA), (B, SB)), "composite")
    return masks_only(model, clip, A, C, prompt=PROMPT, triggers=("sks", "zwx"))


@pytest.mark.parametrize("earlier,later,earlier_name,later_name", [
    ("composite", "switch", "CMLoRA Apply", "CMLoRA Apply"),
    ("switch", "masker", "CMLoRA Apply", "CLoRA Attention Masker"),
    ("masker", "composite", "CLoRA Attention Masker", "CMLoRA Apply"),
], ids=["composite-then-switch", "switch-then-masker", "masker-then-composite"])
def test_second_composing_node_is_refused_naming_both(sd15_narrow, conds, earlier, later, earlier_name, later_name):
    model, clip, _ = sd15_narrow
    weights_before = _base_weights(model)
    hooks_before = _hooks(model)
    first, first_conds = _earlier(earlier, model, clip, conds)
    first_before = ksample(first, first_conds, steps=1)

    prefix = f"[{later_name}]"
    with pytest.raises(CMLoRAError, match="^" + re.escape(prefix)) as info:
        _later(later, first, clip)
    rest = str(info.value)[len(prefix):]
    assert earlier_name in rest, str(info.value)  # the earlier node is named, not only the refusing one
    assert "already" in rest, str(info.value)

    # the refusal changed nothing: the earlier model samples as before, the base model is untouched
    assert torch.equal(ksample(first, first_conds, steps=1), first_before)
    assert _hooks(model) == hooks_before
    weights_after = _base_weights(model)
    assert weights_after.keys() == weights_before.keys()
    for k, v in weights_after.items():
        assert v == weights_before[k], k


def _base_weights(model):
    """Digests of the weights the base model samples with (loaded as the host loads it: the model
    object is shared by every clone, so it holds the patches of whichever clone the host loaded
    last); digests, not copies of a 1.6 GB model per call."""
    with torch.no_grad():
        comfy.model_management.load_models_gpu([model])
    return digests(model.model.diffusion_model.state_dict())


def _hooks(m):
    """What a model patcher carries besides its weights: wrappers, attachments, injections, patches."""
    return ({(t, k, len(v)) for t, by_key in m.wrappers.items() for k, v in by_key.items()},
            {k: id(v) for k, v in m.attachments.items()}, {k: len(v) for k, v in m.injections.items()},
            len(m.patches), {k: sorted(map(str, v)) for k, v in
                             m.model_options.get("transformer_options", {}).get("patches_replace", {}).items()})


# ----------------------------------------------------------------------------- rule 5
class ForeignWrapper(Recorder):
    """Another pack's DIFFUSION_MODEL wrapper: passes through, and counts (records) its calls."""


class ApplyModelCounter:
    """Counts the host's apply_model calls (one diffusion-model call each), independently of the pack."""

    def __init__(self):
        self.count = 0

    def __call__(self, executor, *args, **kwargs):
        self.count += 1
        return executor(*args, **kwargs)


def test_other_packs_wrappers_and_attachments_survive(sd15_narrow, conds):
    from comfyui_cmlora.nodes.runtime import runtime_of

    WMP = comfy.patcher_extension.WrappersMP
    model = sd15_narrow[0]
    foreign, counter, token = ForeignWrapper(), ApplyModelCounter(), object()
    theirs = model.clone()
    theirs.add_wrapper_with_key(WMP.DIFFUSION_MODEL, "otherpack", foreign)
    theirs.set_attachments("otherpack", token)
    theirs.add_wrapper_with_key(WMP.APPLY_MODEL, "test-counter", counter)  # the test's own call count

    patched = apply(theirs, stack((A, SA), (B, SB)), "composite")
    assert patched.get_attachment("otherpack") is token
    assert patched.get_wrappers(WMP.DIFFUSION_MODEL, "otherpack") == [foreign]  # nothing added under its key

    ours = ksample(patched, conds, steps=STEPS)
    # the foreign wrapper ran on every diffusion-model call, and its attachment is still there
    assert counter.count > 0 and len(foreign.calls) == counter.count, (len(foreign.calls), counter.count)
    assert patched.get_attachment("otherpack") is token

    # the same image as composite without the foreign wrapper ...
    plain = ksample(apply(model, stack((A, SA), (B, SB)), "composite"), conds, steps=STEPS)
    assert torch.allclose(ours, plain, atol=ATOL_SAMPLE), (ours - plain).abs().max()
    # ... and what it saw on every call is the mean of the host's LoraLoader A and LoraLoader B
    refs = [lora_loader(model, (A, SA)), lora_loader(model, (B, SB))]
    for call, expected in zip(foreign.calls, _mean_outs(refs, foreign.calls)):
        assert torch.allclose(call["out"], expected, atol=ATOL_CALL), (call["out"] - expected).abs().max()

    # every wrapper key the pack added carries the pack's prefix
    def keys(m):
        return {(wtype, key) for wtype, by_key in m.wrappers.items() for key in by_key}

    added = keys(patched) - keys(theirs)
    assert added, "the pack registered no wrapper"
    assert all(isinstance(key, str) and key.startswith(PACK_PREFIX) for _, key in added), sorted(added, key=str)
    assert {key for _, key in keys(patched)} - {key for _, key in added} <= {"otherpack", "test-counter"}

    # the pack's own attachment is found through its public accessor, apart from the foreign one
    runtime = runtime_of(patched)
    assert runtime is not None and runtime is not token
    assert runtime_of(theirs) is None  # the input model carries no runtime
