"""LoRA files: every format the host reads, the CLIP side, the SDXL model, and bad input."""
from __future__ import annotations

import pytest
import torch

import comfy.sd
import comfy.utils
import nodes as host_nodes

from _util import Recorder, apply, diffusion_out, ksample, lora_loader, stack

from comfyui_cmlora.cmlora_core.errors import CMLoRAError
from comfyui_cmlora.nodes.apply_nodes import ApplyNode, SamplerNode
from comfyui_cmlora.nodes.loras import map_model_lora
from comfyui_cmlora.nodes.stack_nodes import ApplyClip, StackFromLoraStack
from comfyui_cmlora.nodes.runtime import runtime_of

FORMATS = {"kohya": "kohya", "locon": "locon", "peft": "peft", "loha": "loha", "lokr": "lokr"}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_maps_all_keys_and_composes_exactly(sd15, conds, fmt):
    model = sd15[0]
    name = f"test_{fmt}.safetensors"
    st = stack((name, 1.0))
    entry = st.entries[0]
    assert entry.info.format == FORMATS[fmt]
    assert entry.trigger == f"trg{fmt}"  # read from ss_tag_frequency
    mapped = map_model_lora(model, entry, "test")
    assert mapped.unmapped == [] and mapped.n_mapped > 0
    # the routed path (low-rank or dense delta) equals LoraLoader's merged weights
    outer = Recorder()
    ksample(apply(outer.attach(model), stack((name, 0.8)), "composite"), conds, steps=1)
    call = outer.calls[0]
    expected = diffusion_out(lora_loader(model, (name, 0.8)), call)
    assert torch.allclose(call["out"], expected, atol=1e-4), (call["out"] - expected).abs().max()


def test_apply_clip_equals_lora_loader(sd15):
    model, clip, _ = sd15
    st = stack({"lora_name": "test_kohya.safetensors", "strength_clip": 0.7},
               {"lora_name": "test_peft.safetensors", "strength_clip": 0.5},
               {"lora_name": "test_loha.safetensors", "strength_clip": 1.0})  # no text-encoder weights
    ours = ApplyClip.execute(clip=clip, stack=st).args[0]
    ref = host_nodes.LoraLoader().load_lora(model, clip, "test_kohya.safetensors", 0.0, 0.7)[1]
    ref = host_nodes.LoraLoader().load_lora(model, ref, "test_peft.safetensors", 0.0, 0.5)[1]
    tokens = clip.tokenize("a trgkohya cat")
    a = ours.encode_from_tokens(tokens)
    b = ref.encode_from_tokens(tokens)
    base = clip.encode_from_tokens(tokens)
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, base, atol=1e-3)


def test_sdxl_architecture_switch_and_composite(sdxl, models_dir):
    model = sdxl
    assert "SDXL" in type(model.model).__name__  # detected by the host as an SDXL-class model
    path = models_dir / "loras" / "test_xl_a.safetensors"
    path_b = models_dir / "loras" / "test_xl_b.safetensors"
    pos = [[torch.randn(1, 77, 2048), {"pooled_output": torch.randn(1, 1280)}]]
    neg = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    st = stack(("test_xl_a.safetensors", 1.0), ("test_xl_b.safetensors", 1.0))
    outer = Recorder()
    patched = apply(outer.attach(model), st, "composite")
    ksample(patched, (pos, neg), steps=2)
    refs = []
    for p in (path, path_b):
        refs.append(comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(p)), 1.0, 0)[0])
    for call in outer.calls:
        expected = (diffusion_out(refs[0], call) + diffusion_out(refs[1], call)) / 2
        assert torch.allclose(call["out"], expected, atol=1e-4)
    switched = apply(model, st, "switch", interval=1)
    out = ksample(switched, (pos, neg), steps=2)
    assert torch.isfinite(out).all()
    assert [runtime_of(switched).last_trace.active[i] for i in range(2)] == [0, 1]


def test_strength_zero_and_disabled_entries_are_left_out(sd15, conds):
    model = sd15[0]
    st = stack(("test_kohya.safetensors", 1.0), ("test_locon.safetensors", 0.0),
               {"lora_name": "test_peft.safetensors", "enabled": False})
    patched = apply(model, st, "composite")
    assert len(runtime_of(patched).loras) == 1
    ref = ksample(lora_loader(model, ("test_kohya.safetensors", 1.0)), conds, steps=2)
    assert torch.allclose(ksample(patched, conds, steps=2), ref, atol=1e-4)


def test_lora_stack_type_conversion(sd15):
    st = StackFromLoraStack.execute(lora_stack=[("test_kohya.safetensors", 0.5, 0.25), ("None", 1.0, 1.0)]).args[0]
    assert [(e.name, e.strength_model, e.strength_clip) for e in st] == [("test_kohya.safetensors", 0.5, 0.25)]
    with pytest.raises(CMLoRAError, match="lora_stack"):
        StackFromLoraStack.execute(lora_stack=[("x",)])


# ------------------------------------------------------------------ bad input

def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(CMLoRAError) as e:
        fn(*args, **kwargs)
    return str(e.value)


def test_corrupt_file(models_dir):
    msg = _error(stack, ("test_corrupt.safetensors", 1.0))
    assert "test_corrupt.safetensors" in msg and "could not be read" in msg and "Fix:" in msg


def test_not_a_lora(models_dir):
    msg = _error(stack, ("test_not_a_lora.safetensors", 1.0))
    assert "holds no LoRA weights" in msg and "test_not_a_lora.safetensors" in msg


def test_lora_for_another_architecture(sd15):
    st = stack(("test_sdxl_kohya.safetensors", 1.0))
    msg = _error(apply, sd15[0], st, "composite")
    assert "test_sdxl_kohya.safetensors" in msg and "SD15" in msg
    assert "SDXL" in msg  # the likely cause, guessed from the file


def test_empty_stack_and_all_inactive(sd15):
    from comfyui_cmlora.cmlora_core.stack import LoraStack

    assert "stack is empty" in _error(ApplyNode.execute, model=sd15[0], stack=LoraStack(), method="merge",
                                      switch_interval=5)
    st = stack(("test_kohya.safetensors", 0.0))
    msg = _error(apply, sd15[0], st, "composite")
    assert "inactive" in msg and "strength_model 0" in msg


def test_duplicate_lora(models_dir):
    msg = _error(stack, ("test_kohya.safetensors", 1.0), ("test_kohya.safetensors", 0.5))
    assert "already in this stack" in msg and "CMLoRA LoRA Stack" in msg


def test_missing_file_and_cmlora_without_schedule(sd15):
    assert "is not a LoRA file in the loras folder" in _error(stack, ("no_such_lora.safetensors", 1.0))
    msg = _error(apply, sd15[0], stack(("test_kohya.safetensors", 1.0)), "cmlora")
    assert "schedule" in msg


def test_sampler_node_reports(sd15, conds):
    pos, neg = conds
    out = SamplerNode.execute(model=sd15[0], stack=stack(("test_kohya.safetensors", 1.0), ("test_locon.safetensors", 1.0)),
                              method="switch", switch_interval=1, seed=3, steps=2, cfg=4.0, sampler_name="euler",
                              scheduler="normal", positive=pos, negative=neg,
                              latent_image={"samples": torch.zeros(1, 4, 8, 8)}, denoise=1.0)
    latent, report = out.args
    assert latent["samples"].shape == (1, 4, 8, 8)
    assert "active LoRA per step: [0, 1]" in report and "model keys mapped" in report


def test_a_lora_routing_cannot_apply_is_refused_by_the_apply_node_with_a_fix_for_its_method(sd15, conds, models_dir):
    """A LyCORIS "diff" patch on a GroupNorm weight: the host's merge folds it, the routed methods cannot
    add it in the forward. Refused when the node runs, before any sampling, with a fix for the method."""
    from safetensors.torch import save_file

    name = "test_norm_diff.safetensors"
    save_file({"lora_unet_input_blocks_1_0_in_layers_0.w_norm": torch.full((320,), 0.05)},
              str(models_dir / "loras" / name))
    model = sd15[0]
    with pytest.raises(CMLoRAError) as e:
        apply(model, stack((name, 1.0)), "composite")
    assert "GroupNorm" in str(e.value) and "method 'composite'" in str(e.value)
    assert "use method 'merge' without a step range" in str(e.value)
    with pytest.raises(CMLoRAError) as e:
        apply(model, stack({"lora_name": name, "strength_model": 1.0, "end_at": 0.5}), "merge")
    assert "method 'merge'" in str(e.value) and "remove its step range" in str(e.value)
    # without a range, merge is the host's own fold, as LoraLoader's
    ours = ksample(apply(model, stack((name, 1.0)), "merge"), conds, steps=2)
    assert torch.allclose(ours, ksample(lora_loader(model, (name, 1.0)), conds, steps=2), atol=1e-5)
