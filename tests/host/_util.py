"""Helpers for integration tests: node calls, sampling and recording model calls."""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.utils
import nodes as host_nodes

from comfyui_cmlora.nodes.apply_nodes import ApplyNode
from comfyui_cmlora.nodes.clora_nodes import AttentionMasker
from comfyui_cmlora.nodes.stack_nodes import LoraStackNode

LATENT = 8  # 64x64 images


def stack(*specs, base=None):
    """specs: (lora_name, strength_model) or dicts of LoraStack inputs."""
    st = base
    for spec in specs:
        kw = dict(strength_model=1.0, strength_clip=1.0, enabled=True, category="auto", concept="", trigger="")
        if isinstance(spec, dict):
            kw.update(spec)
        else:
            kw["lora_name"], kw["strength_model"] = spec
        st = LoraStackNode.execute(stack=st, **kw).args[0]
    return st


def apply(model, st, method, interval=5):
    return ApplyNode.execute(model=model, stack=st, method=method, switch_interval=interval).args[0]


def masks_only(model, clip, cat, dog, prompt="a cat and a dog", triggers=("", "")):
    """(model, positive) of the CLoRA Attention Masker with two subjects, a cat (LoRA ``cat``) and a
    dog (LoRA ``dog``): masks only, no latent updates (the cheap way to have CLoRA in a test)."""
    st = stack({"lora_name": cat, "category": "character", "concept": "cat", "trigger": triggers[0]},
               {"lora_name": dog, "category": "object", "concept": "dog", "trigger": triggers[1]})
    return AttentionMasker.execute(model=model, clip=clip, stack=st, prompt=prompt, temperature=0.5, step_size=0.0,
                                   stop_fraction=0.5, extra_iterations=0, mask_threshold=0.4,
                                   attention="conditional", style_scope="global").args


def lora_loader(model, *specs):
    """Chain the host's own LoraLoader node (model only)."""
    for name, strength in specs:
        model = host_nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength)[0]
    return model


def latent(batch=1, size=LATENT):
    return {"samples": torch.zeros(batch, 4, size, size)}


def ksample(model, conds, steps=4, cfg=5.0, sampler="euler", scheduler="normal", seed=1, batch=1, callback=None):
    pos, neg = conds
    lat = latent(batch)["samples"]
    noise = comfy.sample.prepare_noise(lat, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, pos, neg, lat, seed=seed,
                               disable_pbar=True, callback=callback)


class Recorder:
    """A DIFFUSION_MODEL wrapper that records every call's inputs and output."""

    def __init__(self):
        self.calls = []

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        out = executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        self.calls.append({
            "x": x.clone(), "t": timesteps.clone(), "context": context.clone(),
            "y": None if y is None else y.clone(),
            "sigma": float(transformer_options["sigmas"].reshape(-1)[0]),
            "cond_or_uncond": list(transformer_options["cond_or_uncond"]),
            "out": out.clone(),
        })
        return out

    key = "test-recorder"

    def attach(self, model, key=None):
        m = model.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, key or self.key, self)
        return m


def diffusion_out(model, call):
    """The diffusion model of ``model`` (weights loaded as the host loads them) on a recorded call."""
    with torch.no_grad():  # patching quantized weights must not record autograd history
        comfy.model_management.load_models_gpu([model])
    dm = model.model.diffusion_model
    with torch.no_grad():
        kwargs = {} if call["y"] is None else {"y": call["y"]}
        return dm(call["x"], call["t"], context=call["context"], transformer_options={}, **kwargs)


def stepwise_reference(models, conds, sampler, steps, seed=1, cfg=5.0, scheduler="normal", latent_shape=(1, 4, 8, 8)):
    """The run rebuilt from the host's own nodes, one step at a time: step i is a SamplerCustomAdvanced
    run of ``sampler`` over sigmas[i:i+2] with ``models[i]`` (every evaluation of that step, Heun's
    corrector at sigma[i+1] included, uses step i's model), fed the previous step's latent."""
    from comfy_extras import nodes_custom_sampler as cs

    pos, neg = conds
    sigmas = cs.BasicScheduler.execute(models[0], scheduler, steps, 1.0).args[0]
    ksampler = cs.KSamplerSelect.execute(sampler).args[0]
    latent = {"samples": torch.zeros(latent_shape)}
    for i in range(steps):
        noise = cs.RandomNoise.execute(seed).args[0] if i == 0 else cs.DisableNoise.execute().args[0]
        guider = cs.CFGGuider.execute(models[i], pos, neg, cfg).args[0]
        latent = cs.SamplerCustomAdvanced.execute(noise, guider, ksampler, sigmas[i:i + 2], latent).args[0]
    return latent["samples"]


_ONCE: dict = {}


def once(key, compute):
    """``compute()`` the first time ``key`` is asked for in this session, the kept result after: a
    reference shared by the parametrizations of a test (the key names everything it depends on;
    the session-scoped models and conditioning never change)."""
    if key not in _ONCE:
        _ONCE[key] = compute()
    return _ONCE[key]


def _cloned(value):
    if torch.is_tensor(value):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_cloned(v) for v in value)
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    return value


class CallRecorder(Recorder):
    """A DIFFUSION_MODEL wrapper recording every call of any model's forward as the host made it:
    its arguments by name (whatever the model family calls them and however they were passed;
    the transformer options and empty ControlNet residuals left out) and its output.
    ``call_out`` replays a recorded call on another model."""

    key = "test-call-recorder"

    def __call__(self, executor, *args, **kwargs):
        from comfyui_cmlora.nodes.routed import ModelCall

        call = ModelCall.of(executor, args, kwargs)
        kept = {k: v for k, v in call.values.items()
                if k != "transformer_options" and not (k == "control" and v is None)}
        kept = _cloned(kept)  # before the forward, which may pop from the lists it gets
        out = executor(*args, **kwargs)
        self.calls.append({"values": kept, "x": call.x.clone(), "out": out.clone(),
                           "method": executor.original.__name__})  # forward's inner function
        return out


def call_out(model, call):
    """The diffusion model of ``model`` (its patches loaded as sampling loads them) on a call
    recorded by CallRecorder: the function the wrapper wrapped (forward's inner ``_forward``,
    whose argument names the record holds), every argument passed by name."""
    return calls_out(model, [call])[0]


def calls_out(model, calls):
    """``call_out`` of each recorded call, with ``model``'s patches loaded once for all of them."""
    with torch.no_grad():
        comfy.model_management.load_models_gpu([model])
        dm = model.model.diffusion_model
        return [getattr(dm, call["method"])(**call["values"], transformer_options={}) for call in calls]


def digests(tensors: dict) -> dict:
    """{name: (dtype, shape, digest of the bytes)} of each tensor: equal digests mean bit-identical
    tensors, and a digest instead of a copy keeps a test's memory independent of the model's size."""
    import hashlib

    out = {}
    for k, v in tensors.items():
        raw = v.detach().contiguous().reshape(-1).view(torch.uint8).numpy()  # the bytes, any dtype
        out[k] = (v.dtype, tuple(v.shape), hashlib.blake2b(memoryview(raw), digest_size=16).hexdigest())
    return out


def weight_digests(model, keys) -> dict:
    """Digests of the base model's weights named in ``keys`` (state-dict keys of the model,
    ``diffusion_model.`` and the rest), as stored, with no patched clone loaded (the host folds a
    loaded clone's LoRAs into the shared weights until it unloads it): the weights a test patches,
    instead of the whole model, keep the tests of large models cheap in memory and time."""
    comfy.model_management.unload_all_models()
    weights = model.model.state_dict()
    out = digests({k: weights[k] for k in sorted(keys)})
    assert out, "no weights to compare"
    return out


class TorchFlops:
    """A DIFFUSION_MODEL wrapper outside the method's own: torch's FlopCounterMode around every model call,
    so it counts the real model's matrix products as they run (every pass and copy, the routed LoRA
    deltas; not the LoRAs' folding into the weights, nor the decode). Attention runs PyTorch's math
    kernel, whose products the counter sees (it has no formula for the CPU's fused kernel)."""

    def __init__(self):
        self.total = 0

    key = "test-torch-flops"

    def attach(self, model):
        m = model.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, self.key, self)
        return m

    def __call__(self, executor, *args, **kwargs):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            out = executor(*args, **kwargs)
        self.total += counter.get_total_flops()
        return out


def real_pass_flops(model) -> tuple[int, int]:
    """FLOPs of one full and one shallow pass of the real model on real inputs, counted by torch's
    FlopCounterMode as they run (not the pack's meta-device count). Attention runs PyTorch's math
    kernel, whose matrix products the counter sees (it has no formula for the CPU's fused kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from comfyui_cmlora.nodes.unet_split import capture_patch, find_split, shallow_forward

    comfy.model_management.load_models_gpu([model])
    unet = model.model.diffusion_model
    split, sink = find_split(unet), []
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as full:
            unet(x, t, context=context, transformer_options={"patches": {"output_block_patch": [capture_patch(split, sink)]}})
        with FlopCounterMode(display=False) as shallow:
            shallow_forward(unet, split, x, t, context, None, sink[0], {})
    return full.get_total_flops(), shallow.get_total_flops()
