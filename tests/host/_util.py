"""Helpers for integration tests: node calls, sampling and recording model calls."""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.utils
import nodes as host_nodes

from comfyui_cmlora.nodes.apply_nodes import ApplyNode
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

    def attach(self, model, key="test-recorder"):
        m = model.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, key, self)
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
