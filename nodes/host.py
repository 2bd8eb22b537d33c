"""The one module of the pack that imports ComfyUI (``comfy``, ``folder_paths``, ``latent_preview``).

Everything the pack needs from the host goes through here, so a host change lands in one
file. Features are detected, never inferred from version strings.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import sys

import torch

import comfy.lora
import comfy.lora_convert
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.sample
import comfy.sd
import comfy.samplers
import comfy.utils
import comfy.float
import comfy.weight_adapter
from comfy.ldm.modules import attention as _attention
from comfy.ldm.modules.diffusionmodules import openaimodel
import folder_paths
import latent_preview
from comfy_api.latest import ComfyExtension, io, ui  # noqa: F401  (re-exported to the node modules)

from ..cmlora_core.steps import whole_run_totals

WrappersMP = comfy.patcher_extension.WrappersMP
PatcherInjection = comfy.patcher_extension.PatcherInjection
LoRAAdapter = comfy.weight_adapter.LoRAAdapter
ModelPatcher = comfy.model_patcher.ModelPatcher
CLIP = comfy.sd.CLIP
VAE = comfy.sd.VAE
SAMPLER_NAMES = comfy.samplers.KSampler.SAMPLERS
SCHEDULER_NAMES = comfy.samplers.KSampler.SCHEDULERS
calculate_weight = comfy.lora.calculate_weight
get_attr = comfy.utils.get_attr
set_attr_param = comfy.utils.set_attr_param
set_attr = comfy.utils.set_attr
get_key_weight = comfy.model_patcher.get_key_weight
string_to_seed = comfy.model_patcher.string_to_seed
stochastic_rounding = comfy.float.stochastic_rounding
ProgressBar = comfy.utils.ProgressBar
# UNet building blocks, for CMLoRA's shallow pass through the outer blocks
forward_timestep_embed = openaimodel.forward_timestep_embed
timestep_embedding = openaimodel.timestep_embedding
Downsample = openaimodel.Downsample
Upsample = openaimodel.Upsample
UNetModel = openaimodel.UNetModel


# ---------------------------------------------------------------- V3 schema features, detected
def _accepts(func, name: str) -> bool:
    try:
        return name in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False


_SCHEMA_FIELDS = ({f.name for f in dataclasses.fields(io.Schema)} if dataclasses.is_dataclass(io.Schema)
                  else set(inspect.signature(io.Schema).parameters))
# ``advanced=True`` folds an input into the node's "advanced" section on hosts whose V3 API has it
ADVANCED = {"advanced": True} if _accepts(io.Float.Input.__init__, "advanced") else {}


_NEWER_FIELDS = ("search_aliases",)


def schema(**fields) -> "io.Schema":
    """``io.Schema`` without the newer fields this host's V3 API lacks (older hosts then show
    the node exactly as before; ids and inputs never depend on the host)."""
    for name in _NEWER_FIELDS:
        if name not in _SCHEMA_FIELDS:
            fields.pop(name, None)
    return io.Schema(**fields)


def lora_names() -> list[str]:
    return folder_paths.get_filename_list("loras")


def lora_path(name: str) -> str | None:
    """The file a LoRA name stands for, by the host's own lookup: only inside the ``loras``
    folders (absolute paths and ``..`` are read relative to each folder), None when absent."""
    if not isinstance(name, str) or not name or "\x00" in name or len(name) > 1024:
        return None
    return folder_paths.get_full_path("loras", name)


def load_file(path: str) -> dict[str, torch.Tensor]:
    return comfy.utils.load_torch_file(path, safe_load=True)


def throw_if_interrupted() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


class _NotLoaded(logging.Filter):
    """Collects the host's "lora key not loaded" warnings instead of printing them."""

    def __init__(self):
        super().__init__()
        self.keys: list[str] = []

    def filter(self, record):
        msg = record.getMessage()
        if msg.startswith("lora key not loaded: "):
            self.keys.append(msg[len("lora key not loaded: "):])
            return False
        return True


@contextlib.contextmanager
def _collect_not_loaded():
    flt = _NotLoaded()
    root = logging.getLogger()
    root.addFilter(flt)
    try:
        yield flt
    finally:
        root.removeFilter(flt)


def unet_key_map(model_patcher) -> dict:
    return comfy.lora.model_lora_keys_unet(model_patcher.model, {})


def clip_key_map(clip) -> dict:
    return comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})


def map_lora(tensors: dict, key_map: dict) -> tuple[dict, list[str]]:
    """The host's own parsing: (patches keyed by model key, file keys it could not place).

    Runs ``convert_lora`` and ``load_lora`` exactly as ``LoraLoader`` does; the second value
    is the host's own list of unconsumed file keys.
    """
    converted = comfy.lora_convert.convert_lora(tensors)
    with _collect_not_loaded() as flt:
        patches = comfy.lora.load_lora(converted, key_map)
    return patches, flt.keys


def model_state_shapes(model_patcher) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model_patcher.model.state_dict().items()}


def clip_state_shapes(clip) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in clip.cond_stage_model.state_dict().items()}


def ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise=1.0):
    """The stock KSampler's sampling path (noise, preview callback, progress bar)."""
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    callback = latent_preview.prepare_callback(model, steps)
    samples = comfy.sample.sample(
        model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
        denoise=denoise, noise_mask=latent.get("noise_mask"), callback=callback,
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out = latent.copy()
    out["samples"] = samples
    return out


def sample_latent(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, callback):
    """Sample like KSampler, without preview, calling ``callback(step, x0, x, total)`` each step."""
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    return comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                               noise_mask=latent.get("noise_mask"), callback=callback, disable_pbar=True, seed=seed)


def is_dynamic(model_patcher) -> bool:
    """Whether the host loads and patches this model's weights per forward (dynamic VRAM)."""
    probe = getattr(model_patcher, "is_dynamic", None)
    return bool(probe()) if callable(probe) else False


_FOLDABLE = (torch.float32, torch.float16, torch.bfloat16)


def weights_writable(model_patcher, keys) -> bool:
    """Whether the pack may fold LoRA weights into these parameters itself.

    Not when the host manages the weights per forward (dynamic VRAM), nor when a layer
    stores them quantized: it has its own set/convert functions (fp8 scaled), holds a
    tensor subclass (the quantized tensors of newer hosts, GGUF) or an 8-bit float.
    """
    if is_dynamic(model_patcher):
        return False
    for key in keys:
        weight, set_func, convert_func = get_key_weight(model_patcher.model, key)
        if set_func is not None or convert_func is not None:
            return False
        data = weight.data if isinstance(weight, torch.nn.Parameter) else weight
        if type(data) is not torch.Tensor or data.dtype not in _FOLDABLE:
            return False
    return True


@dataclasses.dataclass(frozen=True)
class LoraFactors:
    """The factors of a plain LoRA/LoCon patch: delta = scale * up @ down (optionally through ``mid``)."""

    up: torch.Tensor
    down: torch.Tensor
    alpha: float | None
    mid: torch.Tensor | None  # LoCon's middle (tucker) factor
    dora_scale: torch.Tensor | None
    reshape: object | None  # the shape the host reshapes the weight to before patching

    @property
    def plain(self) -> bool:
        """Up and down only: the delta is a product of two matrices the pack can route itself."""
        return self.mid is None and self.dora_scale is None and self.reshape is None


def patch_key(key) -> tuple[str, tuple | None, object]:
    """(parameter name, offset, function) of a key of the host's LoRA patches: a plain name, or
    (name, (dim, first, count)[, function]) for a slice of a fused weight (Flux's qkv, linear1)."""
    if isinstance(key, str):
        return key, None, None
    return key[0], key[1], key[2] if len(key) > 2 else None


def lora_factors(patch) -> LoraFactors | None:
    """The factors of a host patch when it is a plain LoRA adapter; None for every other adapter
    (LoHa, LoKr, diff, ...), which only the host's own ``calculate_weight`` reads."""
    if not isinstance(patch, LoRAAdapter):
        return None
    up, down, alpha, mid, dora, reshape = patch.weights
    return LoraFactors(up, down, alpha, mid, dora, reshape)


class FoldBuffers:
    """One float32 buffer per weight key, reused by every fold of the key until ``clear()`` (on the
    CPU a fresh weight-sized tensor costs more than the fold's arithmetic: its pages are faulted in)."""

    def __init__(self):
        self._by_key: dict[str, torch.Tensor] = {}

    def get(self, key: str, like: torch.Tensor) -> torch.Tensor:
        buf = self._by_key.get(key)
        if buf is None or buf.shape != like.shape or buf.device != like.device:
            buf = self._by_key[key] = torch.empty(like.shape, dtype=torch.float32, device=like.device)
        return buf

    def retain(self, keys) -> None:
        """Free the other keys' buffers (peak memory stays that of one folded LoRA)."""
        keys = set(keys)
        for key in [k for k in self._by_key if k not in keys]:
            del self._by_key[key]

    def clear(self) -> None:
        self._by_key.clear()


def fold_patch(base_model, key: str, patches: list, strength: float, buffers: FoldBuffers | None = None):
    """Write ``weight + strength * patch`` into a plain float parameter, as the host's patcher does
    (float32 sum, stochastic rounding to the weight's dtype); return the original parameter object,
    which ``set_attr(base_model, key, original)`` puts back. ``patches`` is one LoRA's list of
    (patch, offset, function) on this parameter, as the host's patch keys give them: one with
    offset None, or several on slices of a fused layer (offset (dim, first, count)), applied in
    order as the host's ``calculate_weight`` does.

    With ``buffers`` the sum is made in the key's reused buffer: a single plain LoRA by the adapter's
    own operations (product, scale, add; bit-identical) without temporaries, others by
    ``calculate_weight``."""
    weight = get_key_weight(base_model, key)[0]
    listed = [(strength, patch, 1.0, offset, function) for patch, offset, function in patches]
    if buffers is None:
        work = weight.detach().to(torch.float32, copy=True)
        merged = calculate_weight(listed, work, key)
    else:
        work = buffers.get(key, weight)
        factors = lora_factors(patches[0][0]) if len(patches) == 1 and patches[0][1:] == (None, None) else None
        if factors is not None and factors.plain and factors.up.shape[0] * factors.down[0].numel() == work.numel():
            up = factors.up.to(work.device, torch.float32).flatten(start_dim=1)
            down = factors.down.to(work.device, torch.float32).flatten(start_dim=1)
            alpha = factors.alpha / down.shape[0] if factors.alpha is not None else 1.0
            torch.mm(up, down, out=work.view(up.shape[0], down.shape[1]))  # the adapter's lora_diff
            work.mul_(strength * alpha).add_(weight.detach())  # = weight + (strength * alpha) * lora_diff
            merged = work
        else:
            work.copy_(weight.detach())
            merged = calculate_weight(listed, work, key)
    set_attr_param(base_model, key, stochastic_rounding(merged, weight.dtype, seed=string_to_seed(key)))
    return weight


def patch_difference(base_model, key: str, patch, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """What a patch at strength 1 adds to a parameter (float32), by the host's own ``calculate_weight``
    (every adapter type it knows: LoHa, LoKr, DoRA, diff, ...); ``rows`` (first, count): the patch
    covers only those rows of the parameter (a slice of a fused layer), and so does the result."""
    base = float_weight(base_model, key)
    if rows is not None:
        base = base.narrow(0, rows[0], rows[1])
    return calculate_weight([(1.0, patch, 1.0, None, None)], base.clone(), key) - base


def float_weight(base_model, key: str) -> torch.Tensor:
    """A parameter as a plain float32 tensor, dequantized where the layer stores it quantized."""
    weight, _, convert_func = get_key_weight(base_model, key)
    data = weight.data if isinstance(weight, torch.nn.Parameter) else weight
    if convert_func is not None:
        return convert_func(data.detach(), inplace=False).to(torch.float32)
    if type(data) is not torch.Tensor and hasattr(data, "dequantize"):
        return data.dequantize().to(torch.float32)
    return data.detach().to(torch.float32)


def load_model(model_patcher) -> None:
    """Load (and patch) the model the way sampling does, ahead of it."""
    comfy.model_management.load_models_gpu([model_patcher])


def unload_models() -> None:
    comfy.model_management.unload_all_models()


def original_weights(model_patcher, keys: list[str]) -> dict:
    """Weights as loaded from the checkpoint (before any LoRA the host may have folded in)."""
    out = {}
    for key in keys:
        patches = model_patcher.get_key_patches(key).get(key)
        if patches:
            out[key] = patches[0][0]
    return out


def denoised_affine(model_sampling, sigma: float) -> tuple[float, float]:
    """(keep, gain) with the host's denoised image = keep * x + gain * output at noise level ``sigma``: its
    ``calculate_denoised`` is affine in the sampler's x and the model's output for every prediction type
    (epsilon: 1 and -sigma; v: 1 / (1 + sigma^2) and -sigma / sqrt(1 + sigma^2)), measured on one element.
    Read from the model's sampling as the run has it, so the host's ModelSamplingDiscrete node counts."""
    s = torch.tensor([float(sigma)])
    zero, one = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    base = model_sampling.calculate_denoised(s, zero, zero)
    keep = model_sampling.calculate_denoised(s, zero, one) - base
    gain = model_sampling.calculate_denoised(s, one, zero) - base
    return float(keep.reshape(-1)[0]), float(gain.reshape(-1)[0])


def tokens_of(clip, text: str) -> list[int]:
    """Token ids of ``text`` as the CLIP-L tokenizer gives them, chunks concatenated (77 each)."""
    tokens = clip.tokenize(text)
    key = "l" if "l" in tokens else next(iter(tokens))
    return [int(t[0]) for chunk in tokens[key] for t in chunk]


def word_tokens(clip, text: str) -> list[int]:
    """Token ids of ``text`` alone, without the start, end and padding tokens."""
    tokens = clip.tokenize(text)
    key = "l" if "l" in tokens else next(iter(tokens))
    chunk = [int(t[0]) for t in tokens[key][0]]
    end = chunk[-1]  # the end token, also used as padding
    body = chunk[1:]
    return body[:body.index(end)] if end in body else body


def encode(clip, text: str):
    """(cond, pooled) of ``text``."""
    return clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)


def output_directory() -> str:
    return folder_paths.get_output_directory()


def model_family(model_patcher) -> str:
    """A short name of the base model (for messages), e.g. 'SD15', 'SDXL'."""
    config = getattr(model_patcher.model, "model_config", None)
    return type(config).__name__ if config is not None else type(model_patcher.model).__name__


def meta_diffusion_model(base_model):
    """The model's diffusion network rebuilt on the meta device by its own class from its own
    config: every shape, no weights, nothing computed (for counting FLOPs without running it)."""
    config = base_model.model_config.unet_config
    return type(base_model.diffusion_model)(**config, device="meta", operations=comfy.ops.disable_weight_init)


@contextlib.contextmanager
def meta_attention():
    """PyTorch's attention while counting on the meta device: the host's CPU default asks the
    device for free memory, which meta cannot answer. Every implementation does the same two
    matrix products, so a count does not depend on the choice. Models that imported the function
    into their own module (Flux's ``math``) get the swap too."""
    saved = _attention.optimized_attention
    holders = [m for name, m in list(sys.modules.items())
               if name.startswith("comfy.") and getattr(m, "optimized_attention", None) is saved]
    for m in holders:
        m.optimized_attention = _attention.attention_pytorch
    try:
        yield
    finally:
        for m in holders:
            m.optimized_attention = saved


# ---------------------------------------------------------------- area conditioning

def sampler_sample_args(args: tuple, kwargs: dict):
    """(guider, sigmas, noise, latent_image) of a SAMPLER_SAMPLE wrapper's call: the host calls the
    sampler's ``sample`` with (guider, sigmas, extra_args, callback, noise, latent_image, ...), the noise
    not yet scaled (zeros for a pass that adds none, as KSamplerAdvanced's second pass)."""
    guider = kwargs.get("model_wrap", args[0] if args else None)
    sigmas = kwargs.get("sigmas", args[1] if len(args) > 1 else None)
    noise = kwargs.get("noise", args[4] if len(args) > 4 else None)
    latent = kwargs.get("latent_image", args[5] if len(args) > 5 else None)
    return guider, sigmas, noise, latent


def cond_areas(guider) -> dict:
    """{uuid: area} of the run's conds that the host feeds the model as a crop of the latent
    (Conditioning (Set Area), or Set Mask with 'mask bounds'): area is (sizes..., offsets...) in latent
    cells, one size and offset per latent dimension, as the host resolved it for this run."""
    out = {}
    for conds in (getattr(guider, "conds", None) or {}).values():
        for c in conds or []:
            if isinstance(c, dict) and "uuid" in c and c.get("area") is not None:
                out[c["uuid"]] = tuple(c["area"])
    return out


def area_box(area: tuple, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(height, width, top, left) of an area on a latent of (height, width) ``size``, clipped to it as
    the host clips it (the last two dimensions of an area of any rank)."""
    d = len(area) // 2
    h, w, y, x = int(area[d - 2]), int(area[d - 1]), int(area[2 * d - 2]), int(area[2 * d - 1])
    return min(size[0] - y, h), min(size[1] - x, w), y, x


def cond_order(guider) -> dict:
    """{uuid: (conds name, index)} of the run's conds: where each cond stands in the sampler's inputs.
    The host gives every cond a new uuid each run; this place is the same in the next pass of a split run."""
    return {c["uuid"]: (name, i) for name, conds in (getattr(guider, "conds", None) or {}).items()
            for i, c in enumerate(conds or []) if isinstance(c, dict) and "uuid" in c}


def drops_penultimate(sampler) -> bool:
    """Whether the host's KSampler runs this sampler (a KSAMPLER) on a schedule of one more step with the
    next-to-last noise level dropped (dpm_2, uni_pc, ...): its T-step run begins as T + 1 steps do."""
    function = getattr(sampler, "sampler_function", None)
    names = getattr(comfy.samplers.KSampler, "DISCARD_PENULTIMATE_SIGMA_SAMPLERS", ())
    return function is not None and any(
        getattr(comfy.samplers.sampler_object(n), "sampler_function", None) is function for n in names)


_RUN_TOTALS: dict = {}  # (model sampling's noise levels, pass points) -> whole_run_totals, the latest 16


def run_totals(model_sampling, points: list[float], sampler=None) -> tuple[int, ...]:
    """The step counts of the host's schedules (every scheduler of its samplers, on this model's noise
    levels) that begin with the noise levels ``points`` of a pass that leaves noise: see
    ``steps.whole_run_totals``. Remembered for the latest passes (a workflow queued again costs nothing).
    For a ``sampler`` that KSampler runs on one step more less the next-to-last level (``drops_penultimate``),
    a schedule of T + 1 steps is also its run of T (the sampler nodes' own sigmas keep T + 1)."""
    table = getattr(model_sampling, "sigmas", None)
    fingerprint = (type(model_sampling).__name__, float(model_sampling.sigma_min), float(model_sampling.sigma_max),
                   None if table is None else (table.numel(), float(table.reshape(-1)[table.numel() // 2])))
    key = (fingerprint, tuple(points))
    if key not in _RUN_TOTALS:
        names = list(comfy.samplers.SCHEDULER_NAMES)
        totals = whole_run_totals(points, lambda name, t: comfy.samplers.calculate_sigmas(model_sampling, name, t).tolist(),
                                  names)
        while len(_RUN_TOTALS) >= 16:
            _RUN_TOTALS.pop(next(iter(_RUN_TOTALS)))
        _RUN_TOTALS[key] = tuple(totals)
    totals = _RUN_TOTALS[key]
    return tuple(sorted({*totals, *(t - 1 for t in totals)})) if drops_penultimate(sampler) else totals
