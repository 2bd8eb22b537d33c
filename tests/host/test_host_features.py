"""What differs between host versions, tested on whichever host runs the suite: clones of a
patched model, weights the pack must not write (quantized), the memory estimate, V3 schema
features, and the checkpoints' detection."""
from __future__ import annotations

import pytest
import torch

import comfy.lora
import comfy.model_management
import comfy.utils

from _util import Recorder, apply, digests, ksample, lora_loader, stack

from comfyui_cmlora.nodes import host
from comfyui_cmlora.nodes.runtime import runtime_of

A, B, C = "test_kohya_narrow.safetensors", "test_locon_narrow.safetensors", "test_peft_narrow.safetensors"
# the checkpoint's width, for the fp8 file made from the checkpoint's UNet
WIDE_A, WIDE_C = "test_kohya.safetensors", "test_peft.safetensors"


def _state(model):
    return digests(model.model.state_dict())


@pytest.mark.parametrize("method", ["switch", "composite"])
def test_clones_of_a_patched_model_run_independently(sd15_narrow, conds, method):
    """Cloning a patched model (what every downstream model node does) gives each clone its own
    runtime; the clones and the original sample the same image, each records its own run."""
    model = sd15_narrow[0]
    patched = apply(model, stack((A, 0.9), (B, 0.7)), method, interval=1)
    first, second = patched.clone(), patched.clone()
    runtimes = [runtime_of(m) for m in (patched, first, second)]
    assert len({id(r) for r in runtimes}) == 3
    expected = ksample(patched, conds, steps=3)
    for clone in (first, second):
        out = ksample(clone, conds, steps=3)
        assert torch.equal(out, expected)
    assert all(r.last_trace is not None and r.last_trace.status == "finished" for r in runtimes)
    # a clone run after the original never saw the original's per-run state
    assert runtimes[1].last_trace is not runtimes[0].last_trace
    assert runtimes[1].last_trace.model_calls == runtimes[0].last_trace.model_calls
    # and the base model still samples its own image
    plain = ksample(model, conds, steps=3)
    assert not torch.allclose(plain, expected, atol=1e-3)


def test_clone_chained_through_a_host_model_node(sd15_narrow, conds):
    """A host node that clones the model after CMLoRA Apply (ModelSamplingDiscrete) keeps the LoRAs."""
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    model = sd15_narrow[0]
    patched = apply(model, stack((A, 1.0), (B, 1.0)), "composite")
    # a model node of the host that returns a clone with an object patch of its own (V1 or V3 node)
    node = ModelSamplingDiscrete
    out = node().patch(patched, "eps", False) if hasattr(node, "patch") else node.execute(patched, "eps", False)
    downstream = out[0] if isinstance(out, tuple) else out.args[0]
    assert runtime_of(downstream) is not runtime_of(patched)
    assert torch.allclose(ksample(downstream, conds, steps=2), ksample(patched, conds, steps=2), atol=1e-6)


@pytest.fixture(scope="module")
def fp8_model(models_dir):
    import make_fixtures as fx

    return fx.load_unet(fx.SD15_FP8_UNET)


def _lora_keys(model):
    weights = model.model.state_dict()
    return sorted({k for k in comfy.lora.model_lora_keys_unet(model.model, {}).values()
                   if k in weights and k.endswith(".weight")})


def test_quantized_weights_are_not_writable(fp8_model, sd15_narrow):
    assert not host.weights_writable(fp8_model, _lora_keys(fp8_model))
    assert host.weights_writable(sd15_narrow[0], _lora_keys(sd15_narrow[0]))
    assert not host.is_dynamic(sd15_narrow[0])  # a CPU host always uses the classic patcher


def _dequantized(models_dir):
    """The fp8 file's UNet with every weight dequantized exactly (fp8 value times its scale) into
    float32, loaded through the host's diffusion-model loader: the weights the fp8 layers compute
    with, on which LoraLoader adds a LoRA without rounding back to fp8."""
    import comfy.sd
    from safetensors.torch import load_file

    import make_fixtures as fx

    raw = load_file(str(models_dir / "diffusion_models" / fx.SD15_FP8_UNET))
    sd = {}
    for k, v in raw.items():
        if k == "scaled_fp8" or k.endswith((".scale_weight", ".scale_input")):
            continue
        scale = raw.get(k[:-len("weight")] + "scale_weight") if k.endswith(".weight") else None
        sd[k] = v.float() * scale.float() if scale is not None else v.float()
    return comfy.sd.load_diffusion_model_state_dict(sd)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_switch_on_quantized_weights_routes_and_matches_lora_loader(fp8_model, conds, models_dir):
    """Routed switch adds each LoRA's product to the fp8 layers' output, exactly what LoraLoader computes
    on the same weights dequantized (LoraLoader on the fp8 file itself rounds W + dW back to fp8)."""
    model = fp8_model
    before = _state(model)
    rec = Recorder()
    patched = apply(rec.attach(model), stack((WIDE_A, 1.0), (WIDE_C, 1.0)), "switch", interval=1)
    out = ksample(patched, conds, steps=2)
    trace = runtime_of(patched).last_trace
    assert trace.routed and trace.folds == 0 and [trace.active[s] for s in (0, 1)] == [0, 1]
    assert torch.isfinite(out).all()
    after = _state(model)
    assert before == after

    from _util import diffusion_out

    exact = _dequantized(models_dir)
    refs = [lora_loader(exact, (WIDE_A, 1.0)), lora_loader(exact, (WIDE_C, 1.0))]
    for i, call in enumerate(rec.calls):
        k = trace.active[i]
        ref, ref_base = diffusion_out(refs[k], call), diffusion_out(exact, call)
        base = diffusion_out(model, call)
        # the fp8 model and its dequantized copy differ by up to 5e-4 of the output on these calls
        # without any LoRA (measured; LoraLoader on the fp8 file itself was off by about 5%)
        assert _rel(call["out"], ref) < 5e-3, _rel(call["out"], ref)
        # and the LoRA's effect is the exact one (it is 7% to 45% of the output on these calls)
        assert _rel(call["out"] - base, ref - ref_base) < 1e-2, _rel(call["out"] - base, ref - ref_base)


def test_memory_estimate_counts_the_copies(sd15_narrow, conds, monkeypatch):
    """The host sizes its batches of conds and the memory it frees for N copies of every call."""
    model = sd15_narrow[0]
    estimate = type(model.model).memory_required

    def limit(free):  # the device reports this much free memory
        monkeypatch.setattr(comfy.model_management, "get_free_memory",
                            lambda dev=None, torch_free_too=False: (free, free) if torch_free_too else free)

    def rows_per_call(m, free):
        limit(free)
        rec = Recorder()
        ksample(rec.attach(m), conds, steps=1)
        return sorted({c["x"].shape[0] for c in rec.calls})

    # room for cond and uncond of one plain call together, not for three copies of them
    free = 1.5 * estimate(model.model, [2, 4, 8, 8]) * 1.2
    assert rows_per_call(model, free) == [2]
    patched = apply(model, stack((A, 1.0), (B, 1.0), (C, 1.0)), "composite")
    rec = Recorder()
    limit(free)
    ksample(apply(rec.attach(model), stack((A, 1.0), (B, 1.0), (C, 1.0)), "composite"), conds, steps=1)
    assert sorted({c["x"].shape[0] for c in rec.calls}) == [1]  # the host split the conds
    assert "memory_required" not in vars(model.model)  # nothing left on the model after the run
    monkeypatch.undo()

    seen = []
    real = comfy.model_management.load_models_gpu

    def record(models, memory_required=0, *args, **kwargs):
        seen.append(memory_required)
        return real(models, memory_required, *args, **kwargs)

    monkeypatch.setattr(comfy.model_management, "load_models_gpu", record)
    ksample(model, conds, steps=1)
    ksample(patched, conds, steps=1)
    plain, ours = seen[0], seen[-1]
    assert ours > plain  # the copies are part of what the host frees memory for before sampling


def test_v3_schema_features_where_the_host_has_them(pack):
    from comfy_api.latest import io

    from comfyui_cmlora.nodes.apply_nodes import ApplyNode
    from comfyui_cmlora.nodes.cmlora_nodes import SchedulerNode

    schema = ApplyNode.define_schema()
    has_aliases = "search_aliases" in getattr(io.Schema, "__dataclass_fields__", {})
    assert (schema.search_aliases == ["multi lora", "lora composite", "lora switch", "lora merge", "compose loras"]
            if has_aliases else not hasattr(schema, "search_aliases") or not schema.search_aliases)
    info = SchedulerNode.define_schema()
    names = [i.id for i in info.inputs]
    # widget order is a contract with saved workflows, whatever the host
    assert names == ["profile", "mode", "switch_interval", "cache", "refresh", "refresh_interval", "h_to_l_fraction",
                     "online_threshold", "w_dom", "dominant_full", "stack", "preview_steps"]
    refresh = next(i for i in info.inputs if i.id == "refresh_interval")
    assert getattr(refresh, "advanced", None) is (True if host.ADVANCED else None)


def test_generated_checkpoints_are_detected_by_this_host(sd15_narrow, sdxl):
    assert type(sd15_narrow[0].model.model_config).__name__ == "SD15"
    assert "SDXL" in type(sdxl.model).__name__ and sdxl.model.model_config.unet_config["context_dim"] == 2048


def test_a_second_stack_on_a_patched_model_is_a_clear_error(sd15_narrow, conds):
    """Chaining CMLoRA Apply into CMLoRA Apply would nest one runtime inside the other."""
    from comfyui_cmlora.cmlora_core.errors import CMLoRAError

    model = sd15_narrow[0]
    patched = apply(model, stack((A, 1.0), (B, 1.0)), "composite")
    with pytest.raises(CMLoRAError, match=r"\[CMLoRA Apply\].*'model'.*already composes a LoRA stack.*one stack"):
        apply(patched, stack((C, 1.0), (B, 1.0)), "switch")
    # the first patched model still samples as before
    assert torch.equal(ksample(patched, conds, steps=1), ksample(patched.clone(), conds, steps=1))


def test_the_pack_on_the_hosts_own_cpu_attention(sd15_narrow, conds, monkeypatch):
    """The suite starts the host as `--use-pytorch-cross-attention` would (tests/_host.py; faster on the
    CPU, BENCHMARKS.md). This test runs on the host's own choice for a CPU, its sub-quadratic attention:
    switch with one LoRA samples LoraLoader's image bit for bit, composite of two LoRAs runs every
    attention layer through it, and its image differs from the suite's attention by float noise only."""
    import comfy.ldm.modules.attention as attention

    assert attention.optimized_attention is attention.attention_pytorch  # the suite's setting took
    model = sd15_narrow[0]
    composite = apply(model, stack((A, 0.9), (B, 0.7)), "composite")
    suite = ksample(composite, conds, steps=3)
    calls = []

    def sub_quad(*args, **kwargs):
        calls.append(1)
        return attention.attention_sub_quad(*args, **kwargs)

    monkeypatch.setattr(attention, "optimized_attention", sub_quad)
    monkeypatch.setattr(attention, "optimized_attention_masked", sub_quad)
    ours = ksample(apply(model, stack((A, 0.9)), "switch", interval=1), conds, steps=3)
    assert calls, "the UNet's attention did not go through the host's sub-quadratic attention"
    assert torch.equal(ours, ksample(lora_loader(model, (A, 0.9)), conds, steps=3))
    default = ksample(composite, conds, steps=3)
    assert torch.allclose(default, suite, atol=1e-3) and not torch.equal(default, suite)
