"""Bad input on the real host: files outside the model folders, NaN, unknown options, stale masks,
and every user-caused exception turned into the pack's error (node, input, fix)."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import comfy.sample
import folder_paths

from _util import apply, ksample, stack

from comfyui_cmlora.cmlora_core.errors import CMLoRAError
from comfyui_cmlora.nodes import loras as lora_files
from comfyui_cmlora.nodes.checks import shown
from comfyui_cmlora.nodes.apply_nodes import ApplyNode, SamplerNode
from comfyui_cmlora.nodes.clora_nodes import AttentionMasker, MaskOutput, build_branches
from comfyui_cmlora.nodes.cmlora_nodes import LoadProfile, ProfilerNode, SaveProfile, SchedulerNode
from comfyui_cmlora.nodes.stack_nodes import LoraStackNode, StackFromLoraStack

GOOD = "test_kohya_narrow.safetensors"
STACK_ARGS = dict(strength_model=1.0, strength_clip=1.0, enabled=True, category="auto", concept="", trigger="")
SCHEDULER_ARGS = dict(mode="offline", switch_interval=5, cache="deep", refresh="nonuniform", refresh_interval=2,
                      h_to_l_fraction=0.55, online_threshold=0.5, w_dom="constant", dominant_full=True, preview_steps=8)


@pytest.fixture(scope="module")
def bad_loras(models_dir, tmp_path_factory):
    """A second loras folder (registered with the host) holding damaged variants of a good LoRA."""
    folder = tmp_path_factory.mktemp("bad_loras")
    good = load_file(str(models_dir / "loras" / GOOD))
    down = next(k for k in good if k.endswith(".lora_down.weight"))
    alpha = next(k for k in good if k.endswith(".alpha"))

    def variant(name, **changes):
        tensors = dict(good)
        tensors.update(changes)
        save_file(tensors, str(folder / name))

    nan = good[down].clone()
    nan[0, 0] = float("nan")
    variant("bad_nan.safetensors", **{down: nan})
    variant("bad_alpha_inf.safetensors", **{alpha: torch.tensor(float("inf"))})
    # finite in the file, but the patched weights overflow float32: NaN predictions while sampling
    huge = {k: torch.full(v.shape, 1e38) for k, v in good.items() if k.endswith((".lora_up.weight", ".lora_down.weight"))}
    variant("bad_overflow.safetensors", **huge)
    rank0 = {k: v[:0] if k.endswith(".lora_down.weight") else v[:, :0] if k.endswith(".lora_up.weight") else v
             for k, v in good.items()}
    save_file(rank0, str(folder / "bad_rank0.safetensors"))
    folder_paths.add_model_folder_path("loras", str(folder))
    return folder


# ------------------------------------------------------------------ 1. no file outside the loras folders
def test_lora_names_resolve_only_inside_the_loras_folders(models_dir, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(models_dir / "loras" / GOOD, outside)
    checkpoint = models_dir / "checkpoints" / next(p.name for p in (models_dir / "checkpoints").iterdir())
    names = [str(outside), str(tmp_path / "missing.safetensors"), "/proc/self/environ", str(checkpoint),
             "../checkpoints/" + checkpoint.name, "../../../../../../../../etc/hostname"]
    messages = set()
    for name in names:
        for call in (lambda name=name: LoraStackNode.execute(lora_name=name, **STACK_ARGS),
                     lambda name=name: StackFromLoraStack.execute(lora_stack=[(name, 1.0, 1.0)])):
            with pytest.raises(CMLoRAError) as e:
                call()
            assert e.value.input in ("lora_name", "lora_stack")
            messages.add(e.value.problem.replace(shown(name), "NAME"))
    # one message for all of them: nothing tells what exists on the disk or what a file holds
    assert messages == {"NAME is not a LoRA file in the loras folder."}
    # a name inside the folder (also with a harmless "./") still works
    assert LoraStackNode.execute(lora_name="./" + GOOD, **STACK_ARGS).args[0].entries[0].info.format == "kohya"


# ------------------------------------------------------------------ 2. NaN caught
@pytest.mark.parametrize("name", ["bad_nan.safetensors", "bad_alpha_inf.safetensors"])
def test_lora_with_nan_or_inf_is_refused_when_loaded(bad_loras, name):
    with pytest.raises(CMLoRAError, match=rf"'{name}' holds NaN or infinite values"):
        LoraStackNode.execute(lora_name=name, **STACK_ARGS)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "0.5", None])
def test_strength_must_be_a_finite_number(models_dir, value):
    with pytest.raises(CMLoRAError, match=r"input 'strength_model': strength_model must be a number"):
        LoraStackNode.execute(lora_name=GOOD, **{**STACK_ARGS, "strength_model": value})


def test_nan_prediction_stops_the_run_naming_the_lora(sd15_narrow, conds, bad_loras):
    model = sd15_narrow[0]
    st = stack((GOOD, 1.0), ("bad_overflow.safetensors", 1.0))
    with pytest.raises(CMLoRAError, match=r"\[CMLoRA Apply\] input 'stack': the prediction at step 0 holds NaN or "
                                          r"infinite values from LoRA 'bad_overflow.safetensors'\."):
        ksample(apply(model, st, "composite"), conds, steps=2)
    with pytest.raises(CMLoRAError, match=r"from LoRA 'bad_overflow.safetensors'"):
        ksample(apply(model, st, "switch", interval=1), conds, steps=2, sampler="euler")  # step 0 is GOOD's
    with pytest.raises(CMLoRAError, match=r"with the merged LoRAs \['test_kohya_narrow.safetensors', 'bad_overflow"):
        ksample(apply(model, st, "merge"), conds, steps=2)
    out = ksample(apply(model, stack((GOOD, 1.0)), "composite"), conds, steps=2)  # the base model is unharmed
    assert torch.isfinite(out).all()


def test_profiler_refuses_nan_scores_and_tiny_latents(sd15_narrow, conds, bad_loras):
    model = sd15_narrow[0]
    pos, neg = conds
    args = dict(model=model, positive=pos, negative=neg, seed=0, steps=2, cfg=5.0, sampler_name="euler",
                scheduler="normal")
    st = stack((GOOD, 1.0), ("bad_overflow.safetensors", 1.0))
    with pytest.raises(CMLoRAError, match=r"input 'stack': sampling LoRA 'bad_overflow.safetensors' alone gave NaN"):
        ProfilerNode.execute(stack=st, latent_image={"samples": torch.zeros(1, 4, 8, 8)}, **args)
    with pytest.raises(CMLoRAError, match=r"input 'latent_image': the latent is 1 pixels"):
        ProfilerNode.execute(stack=stack((GOOD, 1.0)), latent_image={"samples": torch.zeros(1, 4, 1, 1)}, **args)


# ------------------------------------------------------------------ 3. options checked against the host's lists
def test_unknown_options_are_refused_not_replaced(sd15_narrow, conds):
    model = sd15_narrow[0]
    pos, neg = conds
    st = stack((GOOD, 1.0), ("test_peft_narrow.safetensors", 1.0))
    args = dict(model=model, stack=st, method="composite", switch_interval=1, seed=0, steps=1, cfg=5.0,
                sampler_name="euler", scheduler="normal", positive=pos, negative=neg,
                latent_image={"samples": torch.zeros(1, 4, 8, 8)}, denoise=1.0)
    for name, value in (("sampler_name", "nope"), ("scheduler", "nope"), ("method", "nope")):
        with pytest.raises(CMLoRAError, match=rf"\[CMLoRA Sampler\] input '{name}': 'nope' is not one of its options"):
            SamplerNode.execute(**{**args, name: value})
    for name in ("mode", "cache", "refresh", "w_dom"):
        with pytest.raises(CMLoRAError, match=rf"input '{name}': 'nope' is not one of its options"):
            SchedulerNode.execute(stack=st, **{**SCHEDULER_ARGS, name: "nope"})
    model_, clip, _ = sd15_narrow
    clora = dict(model=model_, clip=clip, stack=st, prompt="a cat", temperature=0.5, step_size=20.0,
                 stop_fraction=0.5, extra_iterations=0, mask_threshold=0.4, attention="conditional",
                 style_scope="global")
    for name in ("attention", "style_scope"):
        with pytest.raises(CMLoRAError, match=rf"\[CLoRA Attention Masker\] input '{name}': 'nope' is not one"):
            AttentionMasker.execute(**{**clora, name: "nope"})


# ------------------------------------------------------------------ 4. masks keyed to their run
def _sample(model, positive, negative, size, seed=1):
    lat = torch.zeros(1, 4, size, size)
    return comfy.sample.sample(model, comfy.sample.prepare_noise(lat, seed), 2, 5.0, "euler", "normal", positive,
                               negative, lat, seed=seed, disable_pbar=True)


def test_clora_masks_belong_to_the_samples_they_are_given(sd15_narrow):
    model, clip, _ = sd15_narrow
    st = stack({"lora_name": GOOD, "category": "character", "concept": "cat"},
               {"lora_name": "test_peft_narrow.safetensors", "category": "object", "concept": "dog"})
    masked, positive = AttentionMasker.execute(
        model=model, clip=clip, stack=st, prompt="a cat and a dog", temperature=0.5, step_size=0.0, stop_fraction=0.5,
        extra_iterations=0, mask_threshold=0.4, attention="conditional", style_scope="global").args
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    big = _sample(masked, positive, negative, 16)
    small = _sample(masked, positive, negative, 8)  # the same masker output, reused at another size
    masks, _ = MaskOutput.execute(model=masked, samples={"samples": big}, step=-1).args
    assert masks.shape == (2, 128, 128)  # the big run's masks, not the last run's
    masks, _ = MaskOutput.execute(model=masked, samples={"samples": small}, step=-1).args
    assert masks.shape == (2, 64, 64)
    with pytest.raises(CMLoRAError, match=r"input 'samples': these samples were not made by a recent run"):
        MaskOutput.execute(model=masked, samples={"samples": big + 1}, step=-1)
    with pytest.raises(CMLoRAError, match=r"input 'image': the image batch has 2 images, the masks 1"):
        MaskOutput.execute(model=masked, samples={"samples": small}, step=-1, image=torch.zeros(2, 64, 64, 3))


# ------------------------------------------------------------------ 5. raw exceptions become the pack's errors
def test_rank0_lora_is_a_clear_error(bad_loras):
    with pytest.raises(CMLoRAError, match=r"input 'lora_name': LoRA file 'bad_rank0.safetensors' has empty tensors"):
        LoraStackNode.execute(lora_name="bad_rank0.safetensors", **STACK_ARGS)


def test_trigger_is_inserted_literally(sd15_narrow):
    st = stack({"lora_name": GOOD, "category": "character", "concept": "cat", "trigger": r"\1 $0 \g<0>"},
               {"lora_name": "test_peft_narrow.safetensors", "category": "object", "concept": "dog"})
    subjects = list(st.entries)
    texts = build_branches(sd15_narrow[1], "a cat and a dog", subjects, [])[0]
    assert texts[1] == r"a \1 $0 \g<0> cat and a dog"


def _profile():
    lora = {"name": "a.safetensors", "score": 0.5, "profile": [1.0, 0.5], "curve": [0.5], "set": "H"}
    return {"version": 2, "base_model": "", "loras": [lora, {**lora, "name": "b.safetensors", "set": "L"}],
            "baseline": {"name": "baseline", "score": 0.4, "profile": [1.0, 0.4], "curve": []},
            "high": ["a.safetensors"], "low": ["b.safetensors"], "settings": {}}


def _deep(depth=100_000):
    value = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("change", [
    {"loras": None}, {"high": ["missing.safetensors"]}, {"low": "b.safetensors"}, {"baseline": 3},
    {"loras": [{"name": 1}]}, {"loras": [{"name": "a", "score": float("nan"), "profile": [], "set": "H"}]},
    {"settings": _deep()}, {"baseline": {"name": "b", "score": 0.1, "profile": _deep(), "curve": []}},
    {"version": _deep()},
])
def test_malformed_profiles_are_refused(change, tmp_path):
    profile = {**_profile(), **change}
    with pytest.raises(CMLoRAError, match=r"\[CMLoRA Frequency Scheduler\] input 'profile': this is not a CMLoRA "
                                          r"profile this version can read"):
        SchedulerNode.execute(profile=profile, **SCHEDULER_ARGS)
    with pytest.raises(CMLoRAError, match=r"\[CMLoRA Save Profile\] input 'profile'"):
        SaveProfile.execute(profile=profile, filename="x")
    assert SchedulerNode.execute(profile=_profile(), **SCHEDULER_ARGS).args[0].high == (0,)


@pytest.mark.parametrize("filename", ["x" * 10_000, "a\x00b", "../escape", "/tmp/abs", "sub/dir"])
def test_profile_file_names_are_checked(filename, pack):
    with pytest.raises(CMLoRAError, match=r"\[CMLoRA Save Profile\] input 'filename'"):
        SaveProfile.execute(profile=_profile(), filename=filename)
    with pytest.raises(CMLoRAError, match=r"\[CMLoRA Load Profile\] input 'profile_file'"):
        LoadProfile.execute(profile_file=filename)


@pytest.mark.parametrize("item, match", [
    ((GOOD, "strong", 1.0), r"strength_model of 'test_kohya_narrow.safetensors' must be a number, got 'strong'"),
    ((GOOD, 1.0, [1]), r"strength_clip of 'test_kohya_narrow.safetensors' must be a number, got a list"),
    ((GOOD, 1000.0, 1.0), r"strength_model of 'test_kohya_narrow.safetensors' is 1000.0, outside -20.0..20.0"),
    ((42, 1.0, 1.0), r"42 is not a LoRA file in the loras folder"),
    ((["a"], 1.0, 1.0), r"a list is not a LoRA file in the loras folder"),
])
def test_lora_stack_entries_are_checked(models_dir, item, match):
    with pytest.raises(CMLoRAError, match=r"\[CMLoRA Stack from LORA_STACK\] input 'lora_stack': " + match):
        StackFromLoraStack.execute(lora_stack=[item])


def test_literal_values_for_linked_inputs_are_refused(sd15_narrow):
    model = sd15_narrow[0]
    st = stack((GOOD, 1.0))
    for kwargs, name in ((dict(model="model", stack=st), "model"), (dict(model=model, stack=[1, 2]), "stack"),
                         (dict(model=model, stack=st, schedule={"a": 1}), "schedule")):
        with pytest.raises(CMLoRAError, match=rf"\[CMLoRA Apply\] input '{name}': expects"):
            ApplyNode.execute(method="cmlora" if name == "schedule" else "merge", switch_interval=1, **kwargs)
    with pytest.raises(CMLoRAError, match=r"input 'profile': expects CMLORA_PROFILE, got str"):
        SchedulerNode.execute(profile="profile", **SCHEDULER_ARGS)
    with pytest.raises(CMLoRAError, match=r"input 'lora_stack': expects LORA_STACK, got int"):
        StackFromLoraStack.execute(lora_stack=5)


# ------------------------------------------------------------------ 6. minor
def test_file_cache_is_bounded_by_bytes(models_dir, monkeypatch):
    cache = lora_files._FILES
    cache.clear()
    size = lora_files.load_lora_file(GOOD, "test").nbytes
    monkeypatch.setattr(cache, "budget", size + 1)
    lora_files.load_lora_file("test_peft_narrow.safetensors", "test")
    assert len(cache) == 1 and cache.used <= max(size + 1, cache.used)
    assert cache.used == lora_files.load_lora_file("test_peft_narrow.safetensors", "test").nbytes
