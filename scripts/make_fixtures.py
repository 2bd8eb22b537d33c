"""Build random-weight models and LoRA files with real architectures and real file formats.

No weights can be downloaded on the machines this project is developed and tested on, so
the demo and the tests make their own: a checkpoint with the SD1.5 architecture (the widths its
detection reads, fewer levels and blocks) that the host's CheckpointLoaderSimple detects and loads,
with a full-size CLIP-L text encoder and SD VAE; a tiny SDXL-architecture diffusion model;
and LoRA files for them in the formats artists download (kohya, LoCon, diffusers/PEFT,
LyCORIS LoHa and LoKr). LoRA key names are taken from the host's own key map, so every
file exercises the host's loader exactly as a downloaded one would.

Run with the host importable (``scripts/host_env.sh`` sets this up)::

    python scripts/make_fixtures.py --models-dir /path/to/ComfyUI/models

Files are only rewritten when missing or when FIXTURE_VERSION changes.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

log = logging.getLogger("cmlora.fixtures")

FIXTURE_VERSION = "7"
CHECKPOINT = "cmlora_tiny_sd15.safetensors"
SDXL_UNET = "cmlora_tiny_sdxl_unet.safetensors"
SD15_FP8_UNET = "cmlora_tiny_sd15_unet_scaled_fp8.safetensors"

# SD1.5 as the hosts detect it (model_channels 320, context_dim 768, convolutional projections),
# with three levels of one block each instead of four levels of two: the latent is divided by 4 at
# the deepest level, so 1/32-resolution attention layers exist as in the real model. Channel
# multipliers 1, 2, 1 instead of 1, 2, 4, 4 (detection reads them from the file and accepts any):
# the second level's 640 channels are where the host's FreeU acts on the blocks outside CMLoRA's
# split, and the deepest level at 320 instead of 1280 channels makes the suite's hundreds of
# sampling runs about three times faster (most of the real model's weights sit at 1280 channels).
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [1, 1, 1], "transformer_depth": [1, 1, 1], "channel_mult": [1, 2, 1],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
    "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

# The SDXL family at SDXL's widths (model_channels 320, linear projections, ADM 2816, context
# 2048, 64-channel heads), with the fewest blocks the hosts' detection accepts: the
# input-side depths [0, 2, 5] of KOALA-700M (an SDXL distillation, detected as an SDXL-class
# model by every host version), one transformer block per output level and none in the middle.
SDXL_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
    "model_channels": 320, "num_res_blocks": [1, 1, 1], "transformer_depth": [0, 2, 5],
    "channel_mult": [1, 2, 4], "transformer_depth_middle": -1, "use_linear_in_transformer": True,
    "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 1, 0, 1],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def _init_(module: torch.nn.Module, seed: int) -> None:
    """Deterministic, well-scaled random init (host layers are created uninitialised)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif name.endswith("weight") and ("norm" in name or "ln" in name.split(".")[-2]):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        for name, b in module.named_buffers():
            if "position_ids" in name:
                b.copy_(torch.arange(b.shape[-1]).expand_as(b))


# The SD1.5 fixture's narrow twin: the same model class, blocks and text width at a fifth of the
# channels. No host detects SD1.5 at this width, so it is never written as a checkpoint: the tests
# that compare the pack's sampling with the host's LoraLoader build it in-process
# (``sd15_narrow_patcher``) and load LoRA files written for its widths (``test_<format>_narrow``).
# The tests of the loader path (detection, released key names, ControlNet, inpainting checkpoints)
# and the browser runs keep the checkpoint.
SD15_NARROW = {"model_channels": 64}


def _sd15_unet(seed: int = 0, in_channels: int = 4, narrow: bool = False, device="cpu"):
    """The host's SD1.5 model of the fixture's layout (or its narrow twin's), random weights."""
    import comfy.supported_models

    config = comfy.supported_models.SD15({**SD15_UNET, "in_channels": in_channels, **(SD15_NARROW if narrow else {})})
    model = config.get_model({}, device=device)
    if device != "meta":
        _init_(model.diffusion_model, seed)
    return model


def cpu_patcher(model):
    """A model built in-process, wrapped as the host wraps a loaded one: a ModelPatcher that loads and
    offloads on the CPU (float32, as the host runs a model there)."""
    import comfy.model_patcher

    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def sd15_narrow_patcher():
    """The SD1.5 fixture's narrow twin, random weights, as the host wraps a loaded model."""
    return cpu_patcher(_sd15_unet(narrow=True))


def _sd15_parts(seed: int = 0, in_channels: int = 4):
    import comfy.sd1_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL

    model = _sd15_unet(seed, in_channels)
    clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32)
    _init_(clip, seed + 1)
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                "dropout": 0.0}
    vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    _init_(vae, seed + 2)
    return model, clip, vae


def _fp16(sd: dict) -> dict:
    return {k: v.detach().to(torch.float16).contiguous() for k, v in sd.items() if v.dtype.is_floating_point}


def make_sd15_checkpoint(path: Path, seed: int = 0, in_channels: int = 4) -> None:
    """A single-file checkpoint in the layout of the released SD1.5 files (``in_channels`` 9: the
    layout of the SD1.5 inpainting checkpoints, latent + mask + masked image).

    Key names are written out here rather than taken from the host's
    ``state_dict_for_saving`` (whose signature changed between host versions), so the file
    is the same whichever host wrote it and every host detects it.
    """
    model, clip, vae = _sd15_parts(seed, in_channels)
    sd = {f"model.diffusion_model.{k}": v for k, v in model.diffusion_model.state_dict().items()}
    for k, v in clip.state_dict().items():
        if k.startswith("clip_l.transformer.") and "text_projection" not in k:
            sd["cond_stage_model." + k[len("clip_l."):]] = v
    sd.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    sd = _fp16(sd)
    save_file(sd, str(path), metadata={"cmlora_fixture": FIXTURE_VERSION, "modelspec.architecture": "stable-diffusion-v1"})


# Flux.1 [dev] at its real widths (the hosts' detection fixes 24 heads of 128 channels, so the
# hidden size stays 3072; T5-XXL context 4096, CLIP-L pooled vector 768, guidance embedding)
# with one double-stream and one single-stream block instead of 19 and 38: every kind of layer
# a Flux LoRA patches, fused qkv and linear1 included, at about 0.5 billion parameters.
FLUX_CONFIG = {
    "image_model": "flux", "axes_dim": [16, 56, 56], "num_heads": 24, "mlp_ratio": 4.0, "theta": 10000,
    "out_channels": 16, "qkv_bias": True, "in_channels": 16, "hidden_size": 3072, "context_in_dim": 4096,
    "patch_size": 2, "vec_in_dim": 768, "depth": 1, "depth_single_blocks": 1, "guidance_embed": True,
}


def host_flux_config(config: dict) -> dict:
    """A Flux-family configuration as this host's Flux class takes it: settings its FluxParams does
    not have are left out (an older host), and txt_ids_dims, which newer hosts require, is given as
    their detection gives it for Flux.1 (none) when missing."""
    import dataclasses

    import comfy.ldm.flux.model

    fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    out = {k: v for k, v in config.items() if k in fields or k == "image_model"}
    if "txt_ids_dims" in fields:
        out.setdefault("txt_ids_dims", [])
    return out


def _dit_weight(name: str, shape, gen: torch.Generator) -> torch.Tensor:
    """One random DiT weight, as _init_ draws it, with every norm's scale ones (RMSNorm scales are
    ``.scale`` on some hosts, ``.weight`` on others; trained models have them near one)."""
    if len(shape) >= 2:
        return torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
    if name.endswith(".scale") or (name.endswith("weight") and ("norm" in name or "ln" in name.split(".")[-2])):
        return torch.ones(shape)
    return torch.randn(shape, generator=gen) * 0.02


def _init_dit_(dm: torch.nn.Module, seed: int) -> None:
    """Random DiT weights in place (_dit_weight, in parameter order from one seeded generator)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in dm.named_parameters():
            p.copy_(_dit_weight(name, tuple(p.shape), gen))


def dit_file_key(image_model: str, key: str) -> str:
    """A DiT weight's name as released files name it. Flux-family QK-norm scales are ``*_norm.scale``
    in Black Forest Labs' files; newer hosts name the module's parameter ``*_norm.weight`` and convert
    released names when loading, older ones use ``.scale`` throughout. Writing the release's name
    makes the file the same whichever host wrote it."""
    if image_model in ("flux", "flux2") and key.endswith("_norm.weight"):
        return key[:-len("weight")] + "scale"
    return key


def save_random_dit(model, path: Path, seed: int, version: str) -> None:
    """Write a DiT's diffusion model (built on the meta device) with random weights, bf16 as such
    models are shared, named as released (dit_file_key). Each weight is drawn as _init_dit_ draws
    it, one at a time, so only the bf16 file's tensors are ever held (a 1.8 GB Z-Image file needs
    1.8 GB, not a float32 model beside it)."""
    dm = model.diffusion_model
    image_model = model.model_config.unet_config.get("image_model", "")
    gen = torch.Generator().manual_seed(seed)
    sd = {dit_file_key(image_model, name): _dit_weight(name, tuple(p.shape), gen).to(torch.bfloat16)
          for name, p in dm.named_parameters()}
    assert len(sd) == len(dm.state_dict()), "a DiT with buffers in its state dict: write them too"
    save_file(sd, str(path), metadata={"cmlora_fixture": version})


def _sdxl_model(device="cpu"):
    import comfy.supported_models

    return comfy.supported_models.SDXL(dict(SDXL_UNET_CONFIG)).get_model({}, device=device)


def make_sdxl_unet(path: Path, seed: int = 10) -> None:
    """An SDXL-family diffusion model file (the layout of a UNet-only release)."""
    model = _sdxl_model()
    _init_(model.diffusion_model, seed)
    save_file(_fp16(model.diffusion_model.state_dict()), str(path), metadata={"cmlora_fixture": FIXTURE_VERSION})


def make_sd15_scaled_fp8_unet(checkpoint: Path, path: Path) -> None:
    """The SD1.5 fixture's UNet as a "scaled fp8" diffusion model, the quantized format of
    many shared fp8 files: every linear weight stored as float8_e4m3fn with a per-layer
    ``scale_weight``, a ``scaled_fp8`` marker, everything else fp16. The hosts load such
    layers through operations whose weights the pack must not rewrite."""
    from safetensors.torch import load_file

    prefix = "model.diffusion_model."
    sd = {k[len(prefix):]: v.float() for k, v in load_file(str(checkpoint)).items() if k.startswith(prefix)}
    out = {"scaled_fp8": torch.tensor([], dtype=torch.float8_e4m3fn)}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2:
            scale = v.abs().amax().clamp(min=1e-12) / 448.0
            out[k] = (v / scale).to(torch.float8_e4m3fn)
            out[k[:-len("weight")] + "scale_weight"] = scale.reshape(())
            out[k[:-len("weight")] + "scale_input"] = torch.ones(())
        else:
            out[k] = v.to(torch.float16)
    save_file(out, str(path), metadata={"cmlora_fixture": FIXTURE_VERSION})


def make_sd15_controlnet(path: Path, seed: int = 21) -> None:
    """A ControlNet for the SD1.5 fixture, in the layout of the released ``control_*.pth`` conversions
    (``control_model.`` keys). Its zero convolutions are random, not zero, so its residuals are felt."""
    import comfy.cldm.cldm
    import comfy.ops

    config = {k: v for k, v in SD15_UNET.items() if k != "out_channels"}
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, device="cpu", **config)
    _init_(net, seed)
    save_file(_fp16({f"control_model.{k}": v for k, v in net.state_dict().items()}), str(path),
              metadata={"cmlora_fixture": FIXTURE_VERSION})


def is_current(path: Path) -> bool:
    """Whether ``path`` is a fixture file written by this FIXTURE_VERSION (its safetensors metadata
    says so): files made on demand by a test are rewritten when the fixtures' layout changes."""
    from safetensors import safe_open

    if not path.exists():
        return False
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("cmlora_fixture") == FIXTURE_VERSION


def load_unet(name: str, weight_dtype: str = "default"):
    """A diffusion model from the diffusion_models folder, through the host's own UNETLoader."""
    import nodes as host_nodes

    return host_nodes.UNETLoader().load_unet(name, weight_dtype)[0]


# ---------------------------------------------------------------- LoRA files

def _inverse_key_map(key_map: dict) -> dict[str, list[str]]:
    inverse: dict[str, list[str]] = {}
    for lora_key, model_key in key_map.items():
        if isinstance(model_key, str):
            inverse.setdefault(model_key, []).append(lora_key)
    return inverse


def _pick(names: list[str], style: str) -> str | None:
    for n in names:
        if style == "kohya" and n.startswith(("lora_unet_", "lora_te_")) and "input_blocks" not in n \
                and "output_blocks" not in n and "middle_block" not in n:
            return n
        if style == "kohya_ldm" and n.startswith("lora_unet_") and ("_blocks_" in n or "middle_block" in n):
            return n
        if style == "peft" and n.startswith(("unet.", "text_encoder.")):
            return n
    return None


def _targets(model_sd: dict, include_conv: bool, include_ff: bool = True, only: str | None = None):
    """Model keys a typical LoRA trains: attention projections, feed-forward, (conv)."""
    out = []
    for k, v in model_sd.items():
        if not k.endswith(".weight"):
            continue
        if only is not None and only not in k:
            continue
        attn = any(s in k for s in (".to_q.", ".to_k.", ".to_v.", ".to_out.0.", "q_proj", "k_proj", "v_proj", "out_proj"))
        ff = include_ff and (".ff.net." in k or "mlp.fc" in k) and v.ndim == 2
        conv = include_conv and v.ndim == 4 and ("in_layers" in k or "out_layers" in k)
        if attn or ff or conv:
            out.append(k)
    return sorted(out)


def named_targets(model_sd: dict, key_map: dict, targets: list[str], style: str) -> dict[str, tuple]:
    """{LoRA key name: (out, in, *kernel)} for model keys ``targets``, named as a ``style`` file names
    them (kohya | peft), through the host's own key map."""
    inverse = _inverse_key_map(key_map)
    named = {}
    for mk in targets:
        names = inverse.get(mk, [])
        name = _pick(names, style) or _pick(names, "kohya_ldm")
        if name is not None:
            named[name] = tuple(model_sd[mk].shape)
    return named


def write_lora(path: Path, model_sd: dict | None, key_map: dict | None, *, fmt: str, rank: int = 4, seed: int = 0,
               scale: float = 0.5, targets: list[str] | None = None, trigger: str | None = None,
               up_init=None, named: dict[str, tuple] | None = None) -> dict:
    """Write one LoRA file for the model whose state dict and host key map are given.

    fmt: kohya | locon | peft | loha | lokr. ``named`` ({LoRA key name: target shape}) gives the
    names and shapes directly instead (the model's keys are then not looked up: names of slices of
    fused layers, other file layouts). ``up_init(model_key, shape)`` may fix the up matrices (used
    to build LoRAs with known spectra). Returns the safetensors dict.
    """
    gen = torch.Generator().manual_seed(seed)
    if named is None:
        if targets is None:
            targets = _targets(model_sd, include_conv=fmt in ("locon", "loha", "lokr"))
        named = named_targets(model_sd, key_map, targets, {"peft": "peft"}.get(fmt, "kohya"))
        inverse = _inverse_key_map(key_map)
        model_keys = {name: mk for mk in targets for name in inverse.get(mk, [])}
    else:
        model_keys = {name: name for name in named}
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in named.items():
        out_dim, in_dim = shape[0], shape[1]
        kernel = tuple(shape[2:])
        r = min(rank, out_dim, in_dim)

        def rnd(*shape, s=1.0):
            return (torch.randn(shape, generator=gen) * s).to(torch.float16)

        if fmt in ("kohya", "locon", "peft"):
            down = rnd(r, in_dim, *kernel, s=1.0 / math.sqrt(in_dim * max(1, math.prod(kernel))))
            up = rnd(out_dim, r, *([1] * len(kernel)), s=scale / math.sqrt(r))
            if up_init is not None:
                up = up_init(model_keys[name], tuple(up.shape)).to(torch.float16)
            if fmt == "peft":
                tensors[f"{name}.lora_A.weight"] = down
                tensors[f"{name}.lora_B.weight"] = up
            else:
                tensors[f"{name}.lora_down.weight"] = down
                tensors[f"{name}.lora_up.weight"] = up
                tensors[f"{name}.alpha"] = torch.tensor(float(r), dtype=torch.float16)
        elif fmt == "loha":
            flat_in = in_dim * max(1, math.prod(kernel))
            s = (scale / math.sqrt(flat_in)) ** 0.5
            tensors[f"{name}.hada_w1_a"] = rnd(out_dim, r, s=s)
            tensors[f"{name}.hada_w1_b"] = rnd(r, flat_in, s=s)
            tensors[f"{name}.hada_w2_a"] = rnd(out_dim, r, s=s)
            tensors[f"{name}.hada_w2_b"] = rnd(r, flat_in, s=s)
            tensors[f"{name}.alpha"] = torch.tensor(float(r), dtype=torch.float16)
        elif fmt == "lokr":
            f1 = 4 if out_dim % 4 == 0 else 1
            g1 = 4 if in_dim % 4 == 0 else 1
            tensors[f"{name}.lokr_w1"] = rnd(f1, g1, s=1.0)
            w2_shape = (out_dim // f1, in_dim // g1, *kernel)
            flat = (in_dim // g1) * max(1, math.prod(kernel))
            tensors[f"{name}.lokr_w2_a"] = rnd(w2_shape[0], r, s=scale / math.sqrt(flat))
            tensors[f"{name}.lokr_w2_b"] = rnd(r, flat, s=1.0 / math.sqrt(r))
            tensors[f"{name}.alpha"] = torch.tensor(float(r), dtype=torch.float16)
        else:
            raise ValueError(f"unknown LoRA format {fmt!r}")
    metadata = {"ss_network_dim": str(rank), "ss_network_module": {"loha": "lycoris.kohya", "lokr": "lycoris.kohya"}.get(fmt, "networks.lora")}
    if trigger:
        metadata["ss_tag_frequency"] = json.dumps({"10_" + trigger: {trigger: 20, "solo": 5}})
    save_file(tensors, str(path), metadata=metadata)
    return tensors


DEMO_LORAS = [
    # file name, format, seed, trigger word
    ("cmlora_demo_character.safetensors", "kohya", 1, "sks"),
    ("cmlora_demo_style.safetensors", "kohya", 2, "wtrclr"),
    ("cmlora_demo_background.safetensors", "locon", 3, "mtnbg"),
]


@functools.cache
def _clip_key_map() -> tuple[dict, dict]:
    """The text encoder's state dict (on the meta device: names and shapes) and the host's LoRA key map
    for it, the same for the checkpoint and its twin. The host's SD1ClipModel builds its layers on the
    CPU whatever device it is given (uninitialised, about 0.5 GB until this returns)."""
    import comfy.lora
    import comfy.sd1_clip

    clip = comfy.sd1_clip.SD1ClipModel(device="meta", dtype=torch.float32)
    shapes = {k: torch.empty_like(v, device="meta") for k, v in clip.state_dict().items()}
    return shapes, comfy.lora.model_lora_keys_clip(clip, {})


def sd15_key_maps(narrow: bool = False):
    """The SD1.5 fixture's (or its narrow twin's) model/clip state dicts and the host's LoRA key maps."""
    import comfy.lora

    model = _sd15_unet(narrow=narrow, device="meta")  # the UNet on the meta device: shapes and names only
    clip_sd, clip_map = _clip_key_map()
    return dict(model.state_dict()), comfy.lora.model_lora_keys_unet(model, {}), clip_sd, clip_map


def _sd15_lora_context(narrow: bool = False):
    """(unet state dict, clip state dict, both merged, the host's merged key map)."""
    unet_sd, unet_map, clip_sd, clip_map = sd15_key_maps(narrow)
    return unet_sd, clip_sd, {**unet_sd, **clip_sd}, {**unet_map, **clip_map}


def make_demo_loras(lora_dir: Path) -> list[Path]:
    unet_sd, clip_sd, full_sd, key_map = _sd15_lora_context()
    paths = []
    for name, fmt, seed, trigger in DEMO_LORAS:
        p = lora_dir / name
        write_lora(p, full_sd, key_map, fmt=fmt, seed=seed, trigger=trigger,
                   targets=_targets(unet_sd, include_conv=fmt == "locon") + _targets(clip_sd, False, only="layers.0."))
        paths.append(p)
    return paths


TEST_FORMATS = ("kohya", "locon", "peft", "loha", "lokr")


def ensure_test_loras(models_dir: Path) -> None:
    """LoRA files in every format, one for another architecture, and two broken files."""
    lora_dir = models_dir / "loras"
    unet_dir = models_dir / "diffusion_models"
    lora_dir.mkdir(parents=True, exist_ok=True)
    unet_dir.mkdir(parents=True, exist_ok=True)
    stamp = models_dir / ".cmlora_test_loras_version"
    if stamp.exists() and stamp.read_text().strip() == FIXTURE_VERSION:
        return
    for narrow, suffix in ((False, ""), (True, "_narrow")):
        unet_sd, clip_sd, full_sd, key_map = _sd15_lora_context(narrow)
        for i, fmt in enumerate(TEST_FORMATS):
            te = _targets(clip_sd, False, only="layers.1.") if fmt in ("kohya", "peft") else []
            write_lora(lora_dir / f"test_{fmt}{suffix}.safetensors", full_sd, key_map, fmt=fmt, seed=100 + i,
                       targets=_targets(unet_sd, include_conv=fmt != "kohya" and fmt != "peft") + te,
                       trigger=f"trg{fmt}")
    # an SDXL LoRA (named by the host's SDXL key map) to try on the SD1.5 model
    import comfy.lora

    xl = _sdxl_model()
    xl_sd = xl.state_dict()
    xl_map = comfy.lora.model_lora_keys_unet(xl, {})
    write_lora(lora_dir / "test_sdxl_kohya.safetensors", xl_sd, xl_map, fmt="kohya", seed=7)
    write_lora(lora_dir / "test_xl_a.safetensors", xl_sd, xl_map, fmt="kohya", seed=3)
    write_lora(lora_dir / "test_xl_b.safetensors", xl_sd, xl_map, fmt="locon", seed=4)
    del xl, xl_sd
    make_sdxl_unet(unet_dir / SDXL_UNET)
    make_sd15_scaled_fp8_unet(models_dir / "checkpoints" / CHECKPOINT, unet_dir / SD15_FP8_UNET)
    save_file({"weight": torch.zeros(4, 4)}, str(lora_dir / "test_not_a_lora.safetensors"))
    good = (lora_dir / "test_kohya.safetensors").read_bytes()
    (lora_dir / "test_corrupt.safetensors").write_bytes(good[: len(good) // 3])
    stamp.write_text(FIXTURE_VERSION)


# ---------------------------------------------------------------- DiT models
#
# Flux.1 [dev] and [schnell], Flux.2, Z-Image and Qwen-Image with one block of each kind, built
# from the configuration the hosts' detection derives from a released file, at the widths that
# detection fixes (Flux.1's 24 heads of 128 channels; Z-Image is told from Lumina 2 by its width
# 3840; Qwen-Image's widths are constants of the model class). Flux.2's detection on the current
# host derives its head count from the width, so its fixture is narrower than any release (hidden
# size 1024, 8 heads); a host whose detection fixes Flux.2 at 48 heads (a 6144 width, the
# 32-billion-parameter [dev]) cannot load it, and the tests say so. Every LoRA file patches
# attention and MLP projections in the layouts trainers write, named through the host's own key
# map, and never the modulation layers.
#
# Each fixture also has a narrow twin (``narrow``): the same model class and layer layout at a
# fraction of the width, built in-process (never written as a model file; no host detects such a
# width), with LoRA files of the same layouts at its widths. The tests that compare the pack's
# sampling with the host's LoraLoader run on the twin; the tests of the host's loader path
# (detection, key maps, the checks of a file against a model) on the full-width file.


@dataclass(frozen=True)
class DiTFixture:
    key: str            # short name used in file names and test ids
    title: str          # what the README and test messages call it
    host_class: str     # the class in the host's supported_models that must detect it
    config: dict        # the unet_config the host's detection derives from the file
    latent: tuple       # (channels, pixels per latent cell) of its empty latent
    context_dim: int    # width of the text encoder's hidden states it reads
    cond_extra: dict    # what its text-encode node adds to the conditioning (guidance, ...)
    trains: Callable[[str], bool]   # model keys (weights of linear layers) a LoRA trains
    loras: dict         # file stem: (format, which of the host's names, seed)
    pooled_dim: int | None = None  # width of the pooled text vector it reads (CLIP-L's for Flux.1)
    # file stem: the fused weights whose slices the file patches (q, k, v of a fused qkv, ...), as
    # the host's key map sends them; a stem not listed patches whole weights only
    sliced: dict = field(default_factory=dict)
    # the narrow twin: settings that replace the config's (its width and the text encoder's),
    # and the widths of its text inputs (hidden states, pooled vector)
    narrow: dict = field(default_factory=dict)
    narrow_text: tuple = (64, None)
    seed: int = 0       # of its random weights (its own, so adding a fixture changes no other)
    version: str = "2"

    def unsupported(self) -> str | None:
        """Why the running host cannot load this fixture, or None: it lacks the model class, or its
        detection derives another configuration from the fixture's keys and widths."""
        import comfy.model_detection
        import comfy.supported_models

        if not hasattr(comfy.supported_models, self.host_class):
            return f"this host has no {self.title} support"
        try:
            sd = self.model(device="meta").diffusion_model.state_dict()
        except Exception as e:  # the host's model class takes other settings
            return f"this host's {self.title} class does not take the fixture's configuration ({e})"
        detected = comfy.model_detection.detect_unet_config(sd, "") or {}
        differ = {k: detected.get(k) for k, v in self.config.items() if k in detected and detected[k] != v}
        if not detected or detected.get("image_model") != self.config["image_model"]:
            differ["image_model"] = detected.get("image_model")
        if differ:
            return f"this host's detection reads the {self.title} fixture as {differ}"
        return None

    @property
    def file(self) -> str:
        return f"cmlora_tiny_{self.key}_unet.safetensors"

    def model(self, device="cpu", narrow: bool = False):
        """The host's model of this fixture's class, weights uninitialised (or the narrow twin's)."""
        import comfy.supported_models

        config = dict(self.config, **(self.narrow if narrow else {}))
        if config["image_model"] in ("flux", "flux2"):
            config = host_flux_config(config)
        model_config = getattr(comfy.supported_models, self.host_class)(config)
        model_config.set_inference_dtype(torch.float32, None)
        return model_config.get_model({}, device=device)

    def narrow_file(self, stem: str) -> str:
        """The name of the narrow twin's LoRA file of layout ``stem``."""
        return f"test_{stem}_narrow.safetensors"

    def narrow_patcher(self):
        """The narrow twin as the host wraps a loaded model (a ModelPatcher on the CPU), with the
        fixture's random weights: float32, as the host runs a model on the CPU."""
        model = self.model(narrow=True)
        _init_dit_(model.diffusion_model, self.seed)
        return cpu_patcher(model)


def _in_blocks(key: str, *prefixes: str) -> bool:
    return key.startswith(tuple(f"diffusion_model.{p}" for p in prefixes))


# the fused Flux.1 weights a diffusers file patches on slices: q, k, v of each stream's qkv, and the
# single block's q, k, v and proj_mlp of linear1
_ZIMAGE_QKV = {f"{block}.attention.qkv" for block in ("layers.0", "noise_refiner.0", "noise_refiner.1",
                                                     "context_refiner.0", "context_refiner.1")}
_FLUX1_SLICED = {"double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "single_blocks.0.linear1"}


_FLUX_MODULATION = ("_mod.lin.", ".modulation.lin.")


def _flux_block_layer(key: str) -> bool:
    """A Flux (.1 or .2) block's attention or MLP projection, not its modulation."""
    return _in_blocks(key, "double_blocks.", "single_blocks.") and not any(m in key for m in _FLUX_MODULATION)


# the diffusers names of Flux.2's layers, which the current host also maps onto Flux.1 and no Flux.1 file has
_FLUX2_DIFFUSERS = ("to_qkv_mlp_proj", "attn.to_out", ".linear_in", ".linear_out")
_FLUX1_NARROW = {"hidden_size": 256, "num_heads": 2, "context_in_dim": 64, "vec_in_dim": 32}  # heads of 128

DIT_FIXTURES = {f.key: f for f in [
    DiTFixture(
        "flux1_dev", "Flux.1 [dev]", "Flux", FLUX_CONFIG,
        seed=30, latent=(16, 8), context_dim=4096, cond_extra={"guidance": 3.5}, pooled_dim=768,
        trains=_flux_block_layer,
        loras={
            # diffusers/PEFT: q, k, v of both streams and the single block's q, k, v and proj_mlp are
            # slices of the fused qkv and linear1
            "flux_diffusers": ("peft", lambda name, key: name.startswith("transformer.") and not name.endswith(
                _FLUX2_DIFFUSERS), 42),
            # kohya: whole fused layers (lora_unet_double_blocks_0_img_attn_qkv)
            "flux_kohya": ("kohya", lambda name, key: name.startswith("lora_unet_"), 40),
            # Black Forest Labs / ai-toolkit: the model's own names
            "flux_bfl": ("peft", lambda name, key: name + ".weight" == key, 41),
            # what the hosts make of an XLabs file: its single-block LoRA covers linear1's q, k, v slice
            "flux_xlabs": ("kohya", lambda name, key: name.endswith(".linear1_qkv"), 43),
            # LyCORIS LoKr on the diffusers names of the attention's q, k, v (dense deltas on slices)
            "flux_lokr": ("lokr", lambda name, key: name.startswith("lycoris_") and name.endswith(("_to_q", "_to_k", "_to_v")), 44),
        },
        sliced={"flux_diffusers": _FLUX1_SLICED, "flux_xlabs": {"single_blocks.0.linear1"},
                "flux_lokr": {"double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"}},
        narrow=_FLUX1_NARROW, narrow_text=(64, 32)),
    # Flux.1 [schnell]: [dev]'s layers without the guidance embedding (a few steps, cfg 1)
    DiTFixture(
        "flux1_schnell", "Flux.1 [schnell]", "FluxSchnell", dict(FLUX_CONFIG, guidance_embed=False),
        seed=50, latent=(16, 8), context_dim=4096, cond_extra={}, pooled_dim=768,
        trains=_flux_block_layer,
        loras={
            "flux1_schnell_kohya": ("kohya", lambda name, key: name.startswith("lora_unet_"), 65),
            "flux1_schnell_diffusers": ("peft", lambda name, key: name.startswith("transformer.") and not name.endswith(
                _FLUX2_DIFFUSERS), 66),
        },
        sliced={"flux1_schnell_diffusers": _FLUX1_SLICED},
        narrow=_FLUX1_NARROW, narrow_text=(64, 32)),
    DiTFixture(
        "flux2", "Flux.2 [dev] (narrowed)", "Flux2",
        {"image_model": "flux2", "axes_dim": [32, 32, 32, 32], "num_heads": 8, "mlp_ratio": 3.0,
         "theta": 2000, "out_channels": 128, "global_modulation": True, "mlp_silu_act": True,
         "qkv_bias": False, "ops_bias": False, "default_ref_method": "index", "ref_index_scale": 10.0,
         "txt_ids_dims": [3], "patch_size": 1, "in_channels": 128, "hidden_size": 1024,
         "context_in_dim": 15360, "vec_in_dim": None, "depth": 1, "depth_single_blocks": 1,
         "guidance_embed": True, "yak_mlp": False, "txt_norm": False},
        seed=51, latent=(128, 16), context_dim=15360, cond_extra={"guidance": 4.0},
        trains=_flux_block_layer,
        loras={
            # ai-toolkit's Flux.2 files use the model's own names
            "flux2_bfl": ("peft", lambda name, key: name + ".weight" == key, 60),
            # diffusers: q, k, v of the double blocks are slices of the fused qkv; a single block's
            # fused projection is one layer (to_qkv_mlp_proj), as diffusers' Flux.2 names it
            "flux2_diffusers": ("peft", lambda name, key: name.startswith("transformer.") and not (
                "single_transformer_blocks" in name and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "proj_mlp")), 61),
            "flux2_kohya": ("kohya", lambda name, key: name.startswith("lora_unet_"), 62),
        },
        sliced={"flux2_diffusers": {"double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv"}},
        narrow={"hidden_size": 256, "num_heads": 2, "context_in_dim": 64}),
    DiTFixture(
        "zimage", "Z-Image", "ZImage",
        {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 3840, "cap_feat_dim": 2560,
         "n_layers": 1, "qk_norm": True, "n_heads": 30, "n_kv_heads": 30, "axes_dims": [32, 48, 48],
         "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
         "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32},
        seed=53, latent=(16, 8), context_dim=2560, cond_extra={},
        # attention only: at this width the host's loader keeps a float32 copy of every patched
        # weight, and the feed-forwards as well would not fit beside the rest of the CI run
        trains=lambda k: _in_blocks(k, "layers.", "noise_refiner.", "context_refiner.") and ".attention." in k,
        loras={
            # ai-toolkit / diffusers: q, k, v are slices of the fused qkv
            "zimage_diffusers": ("peft", lambda name, key: name.startswith("diffusion_model.") and not name.endswith(".qkv"), 70),
            "zimage_kohya": ("kohya", lambda name, key: name.startswith("lora_unet_"), 71),
            "zimage_lokr": ("lokr", lambda name, key: name.startswith("lycoris_layers_") and name.endswith(("_to_q", "_to_k", "_to_v")), 72),
        },
        sliced={"zimage_diffusers": _ZIMAGE_QKV, "zimage_lokr": {"layers.0.attention.qkv"}},
        narrow={"dim": 256, "n_heads": 2, "n_kv_heads": 2, "cap_feat_dim": 64}),
    DiTFixture(
        "qwen_image", "Qwen-Image", "QwenImage",
        {"image_model": "qwen_image", "in_channels": 64, "num_layers": 1},
        seed=52, latent=(16, 8), context_dim=3584, cond_extra={},
        trains=lambda k: _in_blocks(k, "transformer_blocks.") and "_mod." not in k,
        loras={
            "qwen_image_diffusers": ("peft", lambda name, key: name.startswith("transformer."), 80),
            "qwen_image_kohya": ("kohya", lambda name, key: name.startswith("lora_unet_"), 81),
            "qwen_image_lokr": ("lokr", lambda name, key: name.startswith("lycoris_") and "_attn_" in name, 82),
        },
        narrow={"num_attention_heads": 2, "joint_attention_dim": 64}),
]}


def dit_lora_names(fixture: DiTFixture, model_sd: dict, key_map: dict, layout) -> dict[str, tuple]:
    """{LoRA key name: shape of what it patches} for the weights ``fixture.trains``, one name per
    patched weight or slice (the host's map often has several spellings of one), for the names
    ``layout(name, model key)`` picks."""
    named, seen = {}, set()
    for name, target in sorted(key_map.items()):
        key, offset = (target, None) if isinstance(target, str) else target[:2]
        if not layout(name, key) or key not in model_sd or not key.endswith(".weight"):
            continue
        if model_sd[key].ndim != 2 or not fixture.trains(key) or (key, offset) in seen:
            continue
        seen.add((key, offset))
        out_dim, in_dim = model_sd[key].shape
        named[name] = (offset[2] if offset else out_dim, in_dim)
    return named


def _dit_layout(fixture: DiTFixture, meta_model) -> tuple[str, dict]:
    """(digest, {stem: {LoRA key name: shape}}) of the LoRA files this host would write for
    ``meta_model`` (the fixture or its narrow twin on the meta device): the names the host's key map
    gives. LoRA files written under another host are reused when the digest is the same (both CI
    passes share one cache), rewritten when it differs; the model file is checked by _file_holds."""
    import hashlib

    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(meta_model, {})
    model_sd = meta_model.state_dict()
    loras = {stem: dit_lora_names(fixture, model_sd, key_map, layout) for stem, (_, layout, _) in fixture.loras.items()}
    h = hashlib.sha256(repr(sorted((stem, sorted(named.items())) for stem, named in loras.items())).encode())
    return f"{fixture.version} {h.hexdigest()[:16]}", loras


def _ensure_dit_loras(fixture: DiTFixture, meta_model, lora_dir: Path, stamp: Path, file_of) -> None:
    """The fixture's LoRA files for ``meta_model`` (named ``file_of(stem)``), rewritten when missing or when
    this host's key map names them otherwise than the stamp records (_dit_layout)."""
    lora_dir.mkdir(parents=True, exist_ok=True)
    digest, loras = _dit_layout(fixture, meta_model)
    if stamp.exists() and stamp.read_text().strip() == digest \
            and all((lora_dir / file_of(stem)).exists() for stem in fixture.loras):
        return
    for stem, (fmt, _, seed) in fixture.loras.items():
        write_lora(lora_dir / file_of(stem), None, None, fmt=fmt, seed=seed, named=loras[stem])
    stamp.write_text(digest)


def _file_holds(path: Path, meta_model, version: str) -> bool:
    """Whether the model file at ``path`` is this fixture version's and holds every weight of this
    host's model (``meta_model``) at its shape. More weights are fine: a file written under a host
    whose model has a weight more (Z-Image's final norm on the host of late 2025) loads on the newer
    one as a released file made for either does, its extra weight left unused. Reads the header only."""
    from safetensors import safe_open

    if not path.exists():
        return False
    image_model = meta_model.model_config.unet_config.get("image_model", "")
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("cmlora_fixture") != version:
            return False
        held = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return all(held.get(dit_file_key(image_model, k)) == tuple(v.shape)
               for k, v in meta_model.diffusion_model.state_dict().items())


def ensure_dit_model(models_dir: Path, key: str) -> DiTFixture:
    """One DiT fixture's diffusion model file (bf16, as released) and LoRA files, if missing. Both CI
    passes share the model file where it holds what the host loads (_file_holds): a multi-GB file is
    written once per run, not once per host."""
    fixture = DIT_FIXTURES[key]
    unet_dir = models_dir / "diffusion_models"
    unet_dir.mkdir(parents=True, exist_ok=True)
    meta = fixture.model(device="meta")
    if not _file_holds(unet_dir / fixture.file, meta, fixture.version):
        log.info("writing the %s fixture to %s", fixture.title, unet_dir)
        save_random_dit(meta, unet_dir / fixture.file, fixture.seed, fixture.version)
    _ensure_dit_loras(fixture, meta, models_dir / "loras", models_dir / f".cmlora_{key}_version",
                      lambda stem: f"test_{stem}.safetensors")
    return fixture


def ensure_dit_narrow_loras(models_dir: Path, key: str) -> DiTFixture:
    """The LoRA files of one DiT fixture's narrow twin (its layouts at the twin's widths), if missing."""
    fixture = DIT_FIXTURES[key]
    _ensure_dit_loras(fixture, fixture.model(device="meta", narrow=True), models_dir / "loras",
                      models_dir / f".cmlora_{key}_narrow_version", fixture.narrow_file)
    return fixture


def ensure_demo_models(models_dir: Path) -> dict:
    """Create the demo checkpoint and LoRAs under a ComfyUI models folder if missing."""
    ckpt_dir = models_dir / "checkpoints"
    lora_dir = models_dir / "loras"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    lora_dir.mkdir(parents=True, exist_ok=True)
    stamp = models_dir / ".cmlora_fixture_version"
    fresh = stamp.exists() and stamp.read_text().strip() == FIXTURE_VERSION
    ckpt = ckpt_dir / CHECKPOINT
    if not (fresh and ckpt.exists()):
        log.info("writing %s", ckpt)
        make_sd15_checkpoint(ckpt)
    if not (fresh and all((lora_dir / n).exists() for n, *_ in DEMO_LORAS)):
        log.info("writing demo LoRAs to %s", lora_dir)
        make_demo_loras(lora_dir)
    stamp.write_text(FIXTURE_VERSION)
    return {"checkpoint": CHECKPOINT, "loras": [n for n, *_ in DEMO_LORAS]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", required=True, type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    info = ensure_demo_models(args.models_dir)
    json.dump(info, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    from comfy.cli_args import args as _host_args  # host flags keep their defaults here

    _host_args.cpu = True  # must precede the first import of comfy.model_management
    sys.exit(main())
