"""What every benchmark part shares: the host, the models, the LoRAs, the cases and one run.

A *case* is one method (and its settings) with N LoRAs. ``patched_model`` builds it with the
functions the nodes call (``apply_method`` for merge/switch/composite/cmlora, ``attach_clora``
for CLoRA), so the benchmark samples exactly what a workflow samples; ``sample`` runs the
host's own ``comfy.sample.sample`` under inference mode, as the host's executor does.

Models are built from the host's model classes with random weights: the full-size SD1.5
and SDXL UNets (configs as the host detects them from real checkpoints) and the small
SD1.5-architecture UNet of the test fixtures. Conditioning is synthetic (text encoding is
not part of any method's per-image cost and is left out of every number).
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOST = Path(os.environ.get("COMFYUI_PATH") or REPO / ".host" / "ComfyUI")

# UNet configs exactly as comfy.model_detection reports them for real SD1.5 / SDXL checkpoints
SD15_FULL = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SDXL_FULL = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# The timing matrix's small UNet: SD1.5's layout cut to three levels of one block, attention at each,
# channel multipliers 1, 2, 4 at width 128, so that the whole matrix runs on two CPU cores in minutes
SMALL = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 128, "num_res_blocks": [1, 1, 1],
    "transformer_depth": [1, 1, 1], "channel_mult": [1, 2, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


@dataclass(frozen=True)
class Arch:
    name: str
    family: str  # the host's model class: "SD15", "SDXL" or "Flux"
    size: int  # image side in pixels
    context_dim: int
    pooled_dim: int | None = None
    latent_channels: int = 4
    tokens: int = 77  # prompt tokens (CLIP: 77; T5 as Flux pipelines use it: 512)
    cfg: float = 5.0  # 1.0: guidance-distilled, one model call of one row per step
    scheduler: str = "normal"
    guidance: float | None = None  # Flux dev's guidance embedding
    steps: int | None = None  # the FLOP table's steps when not the benchmark's default

    @property
    def unet(self) -> bool:
        return self.family in ("SD15", "SDXL")

    @property
    def rows(self) -> int:
        """Rows of one model call for one image: the CFG pair, or one row without CFG."""
        return 1 if self.cfg == 1.0 else 2


ARCHS = {
    "sd15": Arch("SD1.5", "SD15", 512, 768),
    "sdxl": Arch("SDXL", "SDXL", 1024, 2048, 1280),
    "flux": Arch("Flux.1 [dev]", "Flux", 1024, 4096, 768, latent_channels=16, tokens=512, cfg=1.0,
                 scheduler="simple", guidance=3.5, steps=28),
    "small": Arch("small SD1.5-layout", "SD15", 64, 768),
    "fixture": Arch("the tests' SD1.5-layout fixture", "SD15", 64, 768),
}

# categories given to LoRA i: background LoRAs form CMLoRA's low-frequency set
CATEGORIES = ("character", "background", "style", "object", "clothing")
CMLORA_MODES = ("offline", "online", "async")
CMLORA_CACHES = ("deep", "prediction", "none")


def import_host():
    """Host first on sys.path (its ``nodes`` module must win), CPU unless CUDA is asked for."""
    for p in (str(HOST / "custom_nodes"), str(HOST), str(REPO / "scripts")):
        if p in sys.path:
            sys.path.remove(p)
        sys.path.insert(0, p)
    from comfy.cli_args import args

    if os.environ.get("CMLORA_BENCH_DEVICE", "cpu") == "cpu":
        args.cpu = True
    import comfy.model_management  # noqa: F401  (reads args now)
    import comfyui_cmlora  # noqa: F401

    return sys.modules["comfyui_cmlora"]


# ---------------------------------------------------------------- cases

@dataclass(frozen=True)
class Case:
    method: str  # merge | switch | composite | composite-seq | cmlora | clora
    n: int
    mode: str = "offline"  # cmlora schedule mode
    cache: str = "deep"  # cmlora cache
    dominant_full: bool = True
    updates: bool = True  # clora: contrastive latent updates (False: masks only)
    extra_iterations: int = 20  # clora: the paper's extra updates at the early steps (the tests use fewer)

    @property
    def label(self) -> str:
        if self.method == "clora" and not self.updates:
            return "clora, no latent updates"
        if self.method == "cmlora":
            return f"cmlora {self.mode}/{self.cache}" + ("" if self.dominant_full else " dom-shallow")
        if self.method == "composite-seq":
            return "composite, N sequential"
        return self.method


# ---------------------------------------------------------------- models, LoRAs, conditioning

def unet_config(arch_key: str) -> dict:
    if arch_key == "sd15":
        return dict(SD15_FULL)
    if arch_key == "sdxl":
        return dict(SDXL_FULL)
    import make_fixtures

    if arch_key == "flux":  # the test fixture's Flux.1 [dev] at full depth: 19 double and 38 single blocks
        return dict(make_fixtures.DIT_FIXTURES["flux1_dev"].config, depth=19, depth_single_blocks=38)
    if arch_key == "fixture":
        return dict(make_fixtures.SD15_UNET)
    return dict(SMALL)


def build_model(arch_key: str, device: str, dtype, seed: int = 0):
    """The host's model class with this architecture: weights random, or absent on 'meta'."""
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    config_cls = getattr(comfy.supported_models, ARCHS[arch_key].family)
    config = config_cls(unet_config(arch_key))
    config.set_inference_dtype(dtype, None)
    if device == "meta":
        model = config.get_model({}, device="meta")
        # loaded on the CPU (the sampler's tensors live there), kept on meta: see meta_wrappers
        return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                                offload_device=torch.device("meta"))
    import make_fixtures

    model = config.get_model({}, device="cpu")
    make_fixtures._init_(model.diffusion_model, seed)
    model.diffusion_model.to(device=device, dtype=dtype)
    dev = torch.device(device)
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=dev)


FLUX_LORA_LAYERS = (".img_attn.qkv.", ".img_attn.proj.", ".txt_attn.qkv.", ".txt_attn.proj.", ".img_mlp.",
                    ".txt_mlp.", ".linear1.", ".linear2.")


def lora_targets(model_patcher) -> list[str]:
    """The layers a usual kohya LoRA trains: on a UNet every linear / 1x1 projection of the
    transformer blocks (attention q, k, v, out; feed-forward; proj_in, proj_out); on Flux the
    attention and MLP projections of every block (fused qkv, proj, both MLP layers; the single
    blocks' linear1 and linear2), not the modulation layers."""
    out = []
    for key, w in model_patcher.model.state_dict().items():
        if not key.startswith("diffusion_model.") or not key.endswith(".weight"):
            continue
        if "_blocks." in key and not key.startswith("diffusion_model.input_blocks") \
                and any(s in key for s in FLUX_LORA_LAYERS):
            out.append(key)
            continue
        in_transformer = ".transformer_blocks." in key or ".proj_in." in key or ".proj_out." in key
        if in_transformer and "norm" not in key and (w.ndim == 2 or (w.ndim == 4 and w.shape[2:] == (1, 1))):
            out.append(key)
    return out


def lora_tensors(model_patcher, rank: int, seed: int, device: str, dtype) -> dict:
    """A kohya-format LoRA (diffusers layer names, as Civitai files have) of ``rank`` on every
    target layer; empty tensors on 'meta'."""
    import torch
    from comfyui_cmlora.nodes import host

    names: dict[str, str] = {}
    for lora_key, model_key in host.unet_key_map(model_patcher).items():
        if isinstance(model_key, str) and lora_key.startswith("lora_unet_") \
                and not any(s in lora_key for s in ("input_blocks", "output_blocks", "middle_block")):
            names.setdefault(model_key, lora_key)
    sd = model_patcher.model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key in lora_targets(model_patcher):
        name, w = names[key], sd[key]
        kernel = tuple(w.shape[2:])
        down_shape, up_shape = (rank, w.shape[1], *kernel), (w.shape[0], rank, *([1] * len(kernel)))
        if device == "meta":
            down = torch.empty(down_shape, device="meta", dtype=dtype)
            up = torch.empty(up_shape, device="meta", dtype=dtype)
        else:
            down = (torch.randn(down_shape, generator=gen) / math.sqrt(w.shape[1])).to(device, dtype)
            up = (torch.randn(up_shape, generator=gen) * 0.5 / math.sqrt(rank)).to(device, dtype)
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    return tensors


def mapped_loras(model_patcher, n: int, rank: int, device: str, dtype) -> list:
    """N LoRAs mapped onto the model by the host's own loader, as stack entries."""
    from comfyui_cmlora.cmlora_core.stack import LoraEntry
    from comfyui_cmlora.nodes import host
    from comfyui_cmlora.nodes.loras import MappedLora

    out = []
    for i in range(n):
        patches, not_loaded = host.map_lora(lora_tensors(model_patcher, rank, 100 + i, device, dtype),
                                            host.unet_key_map(model_patcher))
        if not_loaded:
            raise RuntimeError(f"benchmark LoRA keys not loaded: {not_loaded[:3]}")
        entry = LoraEntry(name=lora_name(i), path="", category=lora_category(i), concept=f"concept{i}")
        out.append(MappedLora(entry, patches, [], 0))
    return out


def conditioning(arch_key: str, seed: int = 0, branches: int = 0):
    """(positive, negative, branch contexts): CLIP-shaped random contexts (77 tokens)."""
    import torch

    arch = ARCHS[arch_key]
    gen = torch.Generator().manual_seed(seed)

    def cond():
        ctx = torch.randn(1, arch.tokens, arch.context_dim, generator=gen)
        extra = {} if arch.pooled_dim is None else {"pooled_output": torch.randn(1, arch.pooled_dim, generator=gen)}
        if arch.guidance is not None:
            extra["guidance"] = arch.guidance
        return ctx, extra

    pos, pos_extra = cond()
    neg, neg_extra = cond()
    contexts = [pos] + [cond()[0] for _ in range(branches)]
    return [[pos, pos_extra]], [[neg, neg_extra]], contexts


def concept_positions(n: int) -> list[dict]:
    """Token positions of the N concepts, the same in every branch ("a concept0 and concept1 ...")."""
    found = {c: [2 + 2 * c] for c in range(n)}
    return [dict(found) for _ in range(n + 1)]


def patched_model(case: Case, model_patcher, loras: list, arch_key: str):
    """(model, positive, negative) for the case, built by the nodes' own functions."""
    from comfyui_cmlora.nodes.clora_runtime import Branches, CLoRASettings, attach_clora
    from comfyui_cmlora.nodes.methods import apply_method

    loras = loras[:case.n]
    if case.method == "clora":
        pos, neg, contexts = conditioning(arch_key, branches=case.n)
        branches = Branches(contexts=contexts, concept_tokens=concept_positions(case.n),
                            subject_loras=list(range(case.n)), style_loras=[],
                            concept_names=[ml.entry.concept for ml in loras])
        settings = CLoRASettings(extra_iterations=case.extra_iterations) if case.updates \
            else CLoRASettings(step_size=0.0)
        return attach_clora(model_patcher, loras, branches, settings), pos, neg
    pos, neg, _ = conditioning(arch_key)
    if case.method == "composite-seq":
        from .sequential import apply_sequential_composite

        return apply_sequential_composite(model_patcher, loras), pos, neg
    schedule = cmlora_schedule(case) if case.method == "cmlora" else None
    return apply_method(model_patcher, loras, case.method, 5, "benchmark", schedule), pos, neg


def lora_name(i: int) -> str:
    return f"bench_lora_{i}"


def lora_category(i: int) -> str:
    return CATEGORIES[i % len(CATEGORIES)]


def cmlora_schedule(case: Case):
    """The case's CMLoRA schedule over its N LoRAs, split by their categories (as the Frequency
    Scheduler does without a profile)."""
    from comfyui_cmlora.cmlora_core.cmlora import Schedule, ScheduleSettings, sets_from_categories

    settings = ScheduleSettings(mode=case.mode, cache=case.cache, dominant_full=case.dominant_full)
    high, low = sets_from_categories([lora_category(i) for i in range(case.n)])
    return Schedule(settings, tuple(high), tuple(low), tuple(lora_name(i) for i in range(case.n)))


def runtime_of(model):
    from comfyui_cmlora.nodes.runtime import runtime_of as attached

    return attached(model)


def sample(model, positive, negative, arch_key: str, steps: int, size: int | None = None, seed: int = 1):
    """The host's sampling call (euler; the architecture's usual schedule and CFG: normal and 5 for
    the UNets, simple and 1 for Flux dev), under inference mode as in the executor."""
    import comfy.sample
    import torch

    arch = ARCHS[arch_key]
    side = (size or arch.size) // 8
    latent = torch.zeros(1, arch.latent_channels, side, side)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, arch.cfg, "euler", arch.scheduler, positive, negative, latent,
                                   seed=seed, disable_pbar=True)

