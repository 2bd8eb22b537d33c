"""Training the quality lab's base model and its concept LoRAs on the CPU, from the world's renders.

The base model is the host's own SD1.5 model class (``comfy.supported_models.SD15``, ``lab_config``) at the lab's size:
two levels of 64 and 128 channels with attention at both, 48 input and output channels (the world's
model space, ``world.to_latent``), about 5M parameters; it is a v-prediction model on SD1.5's noise
schedule with its betas halved (``LAB_SCHEDULE``) and reads CLIP-L's 768-wide text context, so the host
samples it like any v-prediction SD1.5 model. (Epsilon prediction drew pixel noise after the same training:
an epsilon model must pass the noise through nearly unchanged at high noise levels, and an error of a few
percent in that gain is left in the image as noise times the highest level. Measured here: 1200 steps of
``quality.lab``'s base training drew a beige field with a light figure under fine noise as v-prediction,
noise with at most a faint blob as epsilon, on SD1.5's schedule or the halved one.) Captions are encoded
once each by a CLIP the caller gives (the tests' random-weight CLIP-L with the real tokenizer:
deterministic embeddings). No host detects SD1.5 at this width from a file, so the
model is built in-process (``lab_model``), not loaded by the checkpoint loader.

A concept LoRA is a rank-r adapter on every linear layer of the attention and feed-forward blocks,
trained with the base frozen, and written as a kohya-format file (``lora_unet_...`` names from the
host's own key map, ``alpha`` = rank, fp16, the trigger word in its metadata) that the host's LoRA
loader and the pack's stack read like a downloaded one.

Which scenes the base and each LoRA learn from is the lab's choice (``sample`` functions); this module
only trains.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .world import Scene, caption, render, to_latent

# the host's SD1.5 model class at the lab's size (its detection would read another model from a file)
LAB_UNET = {
    "use_checkpoint": False, "image_size": 16, "out_channels": 48, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 48, "model_channels": 64,
    "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "channel_mult": [1, 2],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 4,
    "transformer_depth_output": [1, 1, 1, 1], "use_temporal_attention": False, "use_temporal_resblock": False,
}
# SD1.5's noise schedule with its betas halved: noise levels from 0.021 to 3.7 (SD1.5's reach 14.6). The
# world's images (std about 0.5) are already pure noise to the eye at 3.7, so fewer of the trained levels
# are spent where nothing is left to see.
LAB_SCHEDULE = {"linear_start": 0.000425, "linear_end": 0.006}
# the linear layers a LoRA adapts (those a kohya LoRA for SD1.5 trains in the transformer blocks)
LORA_TARGETS = (".attn1.to_q", ".attn1.to_k", ".attn1.to_v", ".attn1.to_out.0", ".attn2.to_q", ".attn2.to_k",
                ".attn2.to_v", ".attn2.to_out.0", ".ff.net.0.proj", ".ff.net.2")

Sampler = Callable[[random.Random, int], list[tuple[Scene, str]]]  # (rng, batch) -> (scene, caption) pairs


def lab_config():
    """The host's SD1.5 model configuration for the lab: its UNet at LAB_UNET, LAB_SCHEDULE's noise levels,
    the world's model space as its latent format (48 channels at unit scale: the host's sampler scales an
    SD1.5 latent by 0.18215), and not an inpainting model (the host takes more than 4 input channels for one)."""
    import comfy.latent_formats
    import comfy.model_base
    import comfy.supported_models

    class LabLatent(comfy.latent_formats.LatentFormat):
        latent_channels = 48
        scale_factor = 1.0

    class LabSD15(comfy.supported_models.SD15):
        latent_format = LabLatent
        sampling_settings = LAB_SCHEDULE

        def inpaint_model(self):
            return False

        def model_type(self, state_dict, prefix=""):
            return comfy.model_base.ModelType.V_PREDICTION

    return LabSD15(dict(LAB_UNET))


def lab_model(seed: int = 0):
    """The lab's base model (the host's BaseModel, float32 on the CPU), freshly initialised from
    ``seed``: weights ~ N(0, 1/fan_in), norms 1, biases 0, the output convolution 0."""
    model = lab_config().get_model({}, device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if name.startswith("out.2."):  # the output convolution
                p.zero_()
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return model


class Captions:
    """Caption -> CLIP context (1, 77, 768), each encoded once by the host CLIP object given."""

    def __init__(self, clip):
        self.clip, self.cache = clip, {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        for t in texts:
            if t not in self.cache:
                with torch.no_grad():
                    self.cache[t] = self.clip.encode_from_tokens(self.clip.tokenize(t)).detach().float()
        return torch.cat([self.cache[t] for t in texts])


def diffusion_loss(model, x0: torch.Tensor, context: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The prediction's loss at noise levels drawn uniformly from the model's own discrete schedule: of the
    noise for an epsilon model, of v = (noise - sigma x0) / sqrt(1 + sigma^2) for a v-prediction one."""
    import comfy.model_sampling

    ms = model.model_sampling
    sigma = ms.sigmas[torch.randint(0, len(ms.sigmas), (x0.shape[0],), generator=gen)]
    noise = torch.randn(x0.shape, generator=gen)
    xin = ms.calculate_input(sigma, x0 + noise * sigma.reshape(-1, 1, 1, 1))
    out = model.diffusion_model(xin, ms.timestep(sigma).float(), context=context)
    if isinstance(ms, comfy.model_sampling.V_PREDICTION):
        s = sigma.reshape(-1, 1, 1, 1)
        return F.mse_loss(out, (noise - s * x0) / (1 + s * s).sqrt())
    return F.mse_loss(out, noise)


def train(model, params, sample: Sampler, captions: Captions, steps: int, batch: int = 32, lr: float = 1e-3,
          seed: int = 0, log: Callable[[int, float], None] | None = None, uncond: float = 0.1,
          ema: float | None = None) -> list[float]:
    """AdamW on ``params`` for ``steps`` batches of ``sample``'s scenes; the loss of every step. Only
    ``params`` take gradients meanwhile (hosts differ in whether a model's weights ask for them).

    The learning rate decays to a tenth along a cosine; a share ``uncond`` of captions is replaced by the
    empty prompt, so the model knows the unconditional prediction classifier-free guidance subtracts;
    with ``ema`` the parameters end as their exponential moving average at that decay."""
    params = list(params)
    model_params = list(model.diffusion_model.parameters())
    asked = [p.requires_grad for p in model_params]
    for p in model_params:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.55 + 0.45 * math.cos(math.pi * min(1.0, i / max(1, steps))))
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    average = [p.detach().clone() for p in params] if ema is not None else None
    losses = []
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for step in range(steps):
                pairs = sample(rng, batch)
                x0 = to_latent(torch.stack([render(scene) for scene, _ in pairs]))
                texts = ["" if rng.random() < uncond else text for _, text in pairs]
                loss = diffusion_loss(model, x0, captions(texts), gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                decay.step()
                if average is not None:
                    with torch.no_grad():
                        for a, p in zip(average, params):
                            a.lerp_(p, 1 - ema)
                losses.append(float(loss.detach()))
                if log is not None:
                    log(step, losses[-1])
        if average is not None:
            with torch.no_grad():
                for a, p in zip(average, params):
                    p.copy_(a)
    finally:
        for p, a in zip(model_params, asked):
            p.requires_grad_(a)
    return losses


def concept_sampler(concept_scene: Callable[[random.Random], Scene], trigger: dict[str, str]) -> Sampler:
    """Scenes from ``concept_scene``, captioned with the trigger words (a LoRA's training set)."""
    return lambda rng, batch: [(s, caption(s, trigger)) for s in (concept_scene(rng) for _ in range(batch))]


class LoraAdapters:
    """Rank-``rank`` adapters on the lab model's LORA_TARGETS layers: y = W x + b + up(down(x)), added by
    forward hooks while installed; ``up`` starts at 0, so training starts from the base model."""

    def __init__(self, model, rank: int = 4, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.model, self.rank = model, rank
        self.layers = {name: m for name, m in model.diffusion_model.named_modules()
                       if isinstance(m, torch.nn.Linear) and name.endswith(LORA_TARGETS)}
        self.down, self.up, self._handles = {}, {}, []
        for name, m in self.layers.items():
            self.down[name] = torch.nn.Parameter(torch.randn(rank, m.in_features, generator=gen) / math.sqrt(m.in_features))
            self.up[name] = torch.nn.Parameter(torch.zeros(m.out_features, rank))
            self._handles.append(m.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def add(module, args, output):
            return output + F.linear(F.linear(args[0], self.down[name]), self.up[name])
        return add

    def parameters(self):
        return [*self.down.values(), *self.up.values()]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def save_kohya(self, path: Path, trigger: str, concept: str) -> dict:
        """Write the adapters as a kohya LoRA file (fp16, alpha = rank, so the host applies up @ down at
        strength 1); the trigger word in ``ss_tag_frequency`` as kohya's trainer records it. Returns the
        tensors written."""
        from safetensors.torch import save_file

        names = kohya_names(self.model)
        tensors = {}
        for layer in self.layers:
            name = names[f"diffusion_model.{layer}.weight"]
            tensors[f"{name}.lora_down.weight"] = self.down[layer].detach().to(torch.float16).contiguous()
            tensors[f"{name}.lora_up.weight"] = self.up[layer].detach().to(torch.float16).contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(float(self.rank), dtype=torch.float16)
        metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(self.rank),
                    "ss_network_alpha": str(self.rank), "ss_output_name": f"lab_{concept}",
                    "ss_tag_frequency": json.dumps({f"10_{trigger} {concept}": {trigger: 100, concept: 60}})}
        save_file(tensors, str(path), metadata=metadata)
        return tensors


def kohya_names(model) -> dict[str, str]:
    """Model weight key -> the name a kohya file gives it, from the host's own key map: the diffusers
    block path (``lora_unet_down_blocks_0_...``) kohya's SD1.5 trainer writes, else the model's own."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model, {})
    out: dict[str, str] = {}
    for name, key in key_map.items():
        if not name.startswith("lora_unet_"):
            continue
        diffusers = any(part in name for part in ("down_blocks", "up_blocks", "mid_block"))
        if key not in out or (diffusers and not any(p in out[key] for p in ("down_blocks", "up_blocks", "mid_block"))):
            out[key] = name
    return out
