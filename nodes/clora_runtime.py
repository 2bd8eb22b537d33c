"""CLoRA during sampling: attention capture, contrastive latent updates, masks and fusion.

One ``DIFFUSION_MODEL`` call of the host becomes, in order:

1. at update steps, loss passes: the latent (read back from the model input) gets
   ``x <- x - eta*(1+sigma^2)*grad_x L`` with L the NT-Xent loss of the concepts' cross-
   attention maps. Gradients are taken outside the executor's inference mode on plain
   copies of the weights; each loss pass stops right after the last attention layer the
   loss reads, so autograd keeps only what that backward needs;
2. one batched forward with a copy of the call's rows per prompt branch (base prompt and
   one per subject LoRA, each with its LoRA routed in), which also captures the maps;
3. masks from those maps, the branches fused by the masks, and — when the latent was
   updated — the Euler correction that makes the sampler continue from the new latent.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..cmlora_core.clora import (attention_probs, branch_masks, combine_user_masks, concept_masks, contrastive_loss,
                                 euler_correction, fit_tokens, fit_user_masks, fuse, subject_maps, update_plan,
                                 x_space_step)
from ..cmlora_core.errors import CMLoRAError
from ..cmlora_core.regions import MaskShapeError, check_aspect
from ..cmlora_core.routing import Route, Routing
from . import host
from .routed import ModelCall, check_routable
from .runtime import Runtime, check_finite

log = logging.getLogger("cmlora")
NODE = "CLoRA Attention Masker"
EXACT_SAMPLERS = ("sample_euler",)  # "euler" and "ddim" (ComfyUI runs DDIM as Euler)


class _StopLoss(Exception):
    """Raised by the attention patch once a loss pass has every map it needs."""


@dataclass
class CLoRASettings:
    temperature: float = 0.5
    step_size: float = 20.0
    stop_fraction: float = 0.5
    extra_iterations: int = 20
    mask_threshold: float = 0.4
    attention: str = "conditional"  # or "both"
    style_scope: str = "global"  # or "subjects"
    style_subjects: tuple = ()  # with scope "subjects": the subjects (indices) whose regions get the style; () = all
    morphology: str = "none"  # 3x3 morphology of each subject mask: none, dilate, erode, open, close
    user_masks: torch.Tensor | None = None  # an artist's masks (N or N*b, H, W), subject major
    user_mask_mode: str = "replace"  # with user_masks: replace, add (union) or limit (intersection)


@dataclass
class Branches:
    """Prompt branches: 0 = base prompt, p = subject LoRA p (stack order of the subjects)."""

    contexts: list  # (1, L_p, D) per branch
    concept_tokens: list  # per branch: {concept index: [token positions]}
    subject_loras: list  # runtime LoRA index of branch p >= 1 (index p - 1)
    style_loras: list  # runtime LoRA indices applied to every branch (or to subject branches)
    concept_names: list  # concept words per subject


@dataclass
class CLoRATrace:
    losses: dict = field(default_factory=dict)  # step -> [loss per iteration]
    masks: dict = field(default_factory=dict)  # step -> (N, b, H, W) subject masks at latent size
    latent: torch.Tensor | None = None  # the run's output (CPU), which identifies the run to CLoRA Masks


RECENT_RUNS = 8  # runs of one masked model whose masks CLoRA Masks can still find


def attention_layers(unet) -> tuple[list[tuple[str, int, int]], int]:
    """(block, index, transformer index) of the cross-attention layers at 1/32 image resolution,
    and their downsampling factor relative to the latent.

    That is 1/4 of the latent (SD1.5: two input and three output layers, middle excluded);
    a model without attention there uses its deepest attention level.
    """
    if not isinstance(unet, host.UNetModel):
        raise CMLoRAError(NODE, "model", f"CLoRA reads the concepts from a UNet's cross-attention layers; this model "
                          f"is a {type(unet).__name__}, whose text and image tokens share one joint attention.",
                          "use an SD1.5 or SDXL checkpoint with CLoRA; on this model give each LoRA a mask and use "
                          "method 'regions' in CMLoRA Apply.")
    found = []  # (ds, block, index, depth)
    ds = 1
    for i, block in enumerate(unet.input_blocks):
        for m in block:
            if isinstance(m, host.Downsample):
                ds *= 2
            elif hasattr(m, "transformer_blocks"):
                found.append((ds, "input", i, len(m.transformer_blocks)))
    for i, block in enumerate(unet.output_blocks):
        for m in block:
            if hasattr(m, "transformer_blocks"):
                found.append((ds, "output", i, len(m.transformer_blocks)))
        if any(isinstance(m, host.Upsample) for m in block):
            ds //= 2
    if not found:
        raise CMLoRAError(NODE, "model", "this model has no cross-attention layers to read concepts from.",
                          "use a UNet model (SD1.5, SDXL).")
    target = 4 if any(d == 4 for d, *_ in found) else max(d for d, *_ in found)
    return [(b, i, t) for d, b, i, depth in found if d == target for t in range(depth)], target


def _value(t: torch.Tensor) -> float:
    """A scalar tensor's value; NaN on the meta device (a run counted for FLOPs has no values)."""
    return math.nan if t.is_meta else float(t.detach())


class _Attention:
    """CLoRA's cross-attention at one target layer for one model call: keeps the probabilities and
    hands the output to the patch that was there (an IPAdapter's, say), or computes it."""

    def __init__(self, runtime: "CLoRARuntime", inner):
        self.runtime, self.inner = runtime, inner

    def __call__(self, q, k, v, extra_options):
        return self.runtime.attention(q, k, v, extra_options, self.inner)


class CLoRARuntime(Runtime):
    method = "clora"
    whole_runs_only = True
    whole_run_fix = ("sample in one pass, or split a run of one of the host's schedulers (KSamplerAdvanced with "
                     "the same steps and scheduler in both passes); for a refiner or hires pass after it, feed that "
                     "pass the model from before the CLoRA Attention Masker.")

    def __init__(self, loras, branches: Branches, settings: CLoRASettings, layers, ds_factor: int, node: str = NODE):
        self.branches, self.settings, self.layers = branches, settings, layers
        self.last_layer = layers[-1]
        self.ds_factor = ds_factor
        self.widths = [c.shape[1] for c in branches.contexts]  # tokens of each branch's prompt
        super().__init__(loras, node)
        self.runs: list[CLoRATrace] = []  # finished runs, oldest first
        # what each copy of a model call's rows is, for the NaN stop: branch 0, then one per subject
        self.branch_labels = ["the base prompt's branch"] + [f"LoRA '{loras[i].entry.name}'"
                                                            for i in branches.subject_loras]

    def _reset(self) -> None:
        super()._reset()
        self.maps: list | None = None  # captured (rows, h*w, L) maps of the running pass
        self.loss_pass = False
        self.clora_trace: CLoRATrace | None = None
        self._grad_params: dict | None = None
        self._updated: dict = {}
        self._latent_shape: tuple | None = None  # the sampler's latent (B, C, H, W), from its noise
        self._prompt_y = None  # ADM rows (SDXL) of the Masker's prompt, from the last call that held it
        self._latest_masks = None  # branch masks of the latest call that held the Masker's prompt
        self._iterations: dict[int, int] = {}  # latent-update iterations per step of the pass

    def on_model_patcher_clone(self):
        twin = super().on_model_patcher_clone()
        twin.runs = []
        return twin

    @property
    def last_clora(self) -> CLoRATrace | None:
        return self.runs[-1] if self.runs else None

    def run_of(self, samples: torch.Tensor) -> CLoRATrace | None:
        """The recent run whose output is ``samples`` (a sampler's LATENT), None when none is."""
        samples = samples.detach().to("cpu", torch.float32)
        for run in reversed(self.runs):
            if run.latent is not None and run.latent.shape == samples.shape and torch.equal(run.latent, samples):
                return run
        return None

    def row_factor(self) -> int:
        return len(self.branches.contexts)

    # ------------------------------------------------------------------ attention capture
    def with_capture(self, options: dict) -> dict:
        """``transformer_options`` of one model call with CLoRA's capture at the target layers.

        Set per call, not on the patcher, so that another node's attn2 replace patch (IPAdapter
        registers them under (block, index) on SD1.5 and (block, index, transformer) on SDXL, before
        or after this node) is found as the host would find it and keeps running inside the capture.
        """
        replace = dict(options.get("patches_replace", {}))
        attn2 = dict(replace.get("attn2", {}))
        for block, index, t in self.layers:
            inner = attn2.get((block, index, t), attn2.get((block, index)))
            attn2[(block, index, t)] = _Attention(self, inner)
        replace["attn2"] = attn2
        return {**options, "patches_replace": replace}

    def attention(self, q, k, v, extra_options, inner=None):
        """Cross-attention with its probabilities kept (mean over heads) at the target layers; the
        output is the other node's patch's when one was there."""
        out, probs = attention_probs(q, k, v, extra_options["n_heads"])
        if inner is not None:
            out = inner(q, k, v, extra_options)
        if self.maps is not None:
            self.maps.append(probs)
            key = (extra_options["block"][0], extra_options["block"][1], extra_options.get("block_index", 0))
            if self.loss_pass and key == self.last_layer:
                raise _StopLoss
        return out

    # ------------------------------------------------------------------ one run
    def placed(self, noise) -> None:
        """The pass's latent updates: the whole run's plan (``update_plan``) at the pass's steps. A pass that
        leaves noise may begin runs of several step counts (``Runtime.totals``); they must plan it alike."""
        steps = range(self.offset, self.offset + len(noise))
        plans = {t: tuple(update_plan(t, self.settings.stop_fraction, self.settings.extra_iterations).get(s, 0)
                          for s in steps) for t in self.totals}
        rows = list(plans.values())
        for other in rows[1:]:
            differ = [i for i, (a, b) in enumerate(zip(other, rows[0])) if a != b]
            if differ:
                raise self.split_ambiguity("latent updates", self.offset + differ[0])
        self._iterations = dict(enumerate(next(iter(plans.values()))))

    def begin_run(self, model_patcher) -> None:
        self.clora_trace, self._updated, self._grad_params = CLoRATrace(), {}, None

    def end_run(self, out) -> None:
        if not out.is_meta:
            self.clora_trace.latent = out.detach().to("cpu", torch.float32)

    def cleanup(self) -> None:
        self.maps, self.loss_pass, self._grad_params, self._updated = None, False, None, {}
        self._latest_masks, self._prompt_y = None, None
        if self.clora_trace is not None:
            self.runs = (self.runs + [self.clora_trace])[-RECENT_RUNS:]
        self.clora_trace = None

    def sampler_sample(self, executor, *args, **kwargs):
        noise = kwargs["noise"] if "noise" in kwargs else args[4]
        self._latent_shape = tuple(noise.shape)
        return super().sampler_sample(executor, *args, **kwargs)

    def model_call(self, executor, call: ModelCall, step: int):
        points = self._sigmas
        sigma = float(call.options["sigmas"].reshape(-1)[0])
        model_sampling = self.base_model.model_sampling
        chunks = list(call.options.get("cond_or_uncond", [0]))
        b = call.rows // len(chunks)
        self._check_area(call)
        mine = self._prompt_chunks(call, chunks, b)
        c = self._latent_shape[1] if self._latent_shape else call.x.shape[1]  # inpainting models take more
        c_in = float(model_sampling.calculate_input(torch.tensor(sigma), torch.ones(1)).reshape(-1)[0])
        x_latent = call.x[:b, :c].float() / c_in  # every chunk of a full-size call holds the same latent
        if mine and call.y is not None:
            self._prompt_y = call.y[mine[0] * b:(mine[0] + 1) * b]
        iterations = self._iterations.get(step, 0)
        x_new = None
        if iterations and self.settings.step_size > 0 and len(self.branches.concept_names) >= 2:
            x_new = self._updated.get(step)
            if x_new is None:
                self._check_exact()
                y = self._prompt_y if self._prompt_y is not None else (None if call.y is None else call.y[:b])
                uncond = [j for j, kind in enumerate(chunks) if kind == 1]
                uncond_ctx = (call.context[uncond[0] * b:(uncond[0] + 1) * b]
                              if uncond and self.settings.attention == "both" else None)
                x_new = self.update_latent(executor.class_obj, x_latent, sigma, call.timesteps[:b], y,
                                           call.options, step, iterations,
                                           extra=call.x[:b, c:], uncond_context=uncond_ctx)
                self._updated[step] = x_new
            x = call.x.clone()
            x[:, :c] = (x_new * c_in).to(call.x.dtype).repeat(len(chunks), *([1] * (call.x.ndim - 1)))
            call = call.replaced(x=x)
        out, masks = self._branch_forward(executor, call, chunks, mine, b, step)
        if x_new is not None and step + 1 < len(points):
            keep, gain = host.denoised_affine(model_sampling, sigma)
            corr = euler_correction(x_latent, x_new, sigma, points[step + 1], keep, gain).to(out.dtype)
            out = out + corr.repeat(len(chunks), *([1] * (out.ndim - 1)))
        return out

    def _check_area(self, call: ModelCall) -> None:
        if self._latent_shape is not None and tuple(call.x.shape[-2:]) != tuple(self._latent_shape[-2:]):
            raise CMLoRAError(self.node, "model",
                              f"a prompt of this run covers only part of the image ({list(call.x.shape[-2:])} of the "
                              f"latent's {list(self._latent_shape[-2:])}, as 'Conditioning (Set Area)' makes); the model "
                              "is not told where that part lies, so CLoRA cannot place its masks in it.",
                              "for regional prompts beside CLoRA use 'Conditioning (Set Mask)' (full-size), or sample "
                              "the area prompts with a model that does not come from the CLoRA Attention Masker.")

    def _prompt_chunks(self, call: ModelCall, chunks: list[int], b: int) -> list[int]:
        """The conditional chunks holding the Masker's base prompt (its ``positive`` output): the ones
        whose prompt each branch replaces. Other prompts (Conditioning Combine) keep their own."""
        if call.context.is_meta:  # a run counted for FLOPs has no values to compare; the count is the same
            return [j for j, kind in enumerate(chunks) if kind == 0]
        base = self.branches.contexts[0]
        length = math.lcm(base.shape[1], call.context.shape[1])
        ref = fit_tokens(base.to(call.context), length)[0]
        found = [j for j, kind in enumerate(chunks) if kind == 0
                 and torch.equal(fit_tokens(call.context[j * b:j * b + 1], length)[0], ref)]
        if not found and 0 in chunks and not self.clora_trace.masks:
            raise CMLoRAError(self.node, "positive",
                              "the sampler's positive conditioning does not hold the Masker's prompt, so no branch "
                              "knows where its concept is.",
                              "wire the Masker's 'positive' output into the sampler's positive (Conditioning Combine "
                              "may add other prompts beside it).")
        return found

    def details(self, trace) -> str:
        text = super().details(trace)
        run = self.last_clora if self.clora_trace is None else self.clora_trace
        losses = {step: v for step, v in run.losses.items() if v} if run is not None else {}
        if losses:
            first, last = min(losses), max(losses)
            updates = sum(len(v) for v in losses.values())
            text += (f", {updates} latent updates on steps {first}..{last} (loss {losses[first][0]:.4f} -> "
                     f"{losses[last][-1]:.4f})")
        return text

    # ------------------------------------------------------------------ passes
    def branch_routing(self, rows: int, copies: int) -> Routing:
        """Copy p of the rows gets subject LoRA p (copy 0: none). Style LoRAs: every copy (scope
        "global"), or the copies of the chosen subjects (scope "subjects"; all subjects when none are
        chosen), so after fusion the style acts inside those subjects' masks only."""
        routes = [Route(lora, p * rows, (p + 1) * rows, self.routed.strengths[lora])
                  for p, lora in enumerate(self.branches.subject_loras, start=1)]
        if self.settings.style_scope == "global":
            spans = [(0, copies * rows)]
        else:
            chosen = self.settings.style_subjects or tuple(range(len(self.branches.subject_loras)))
            spans = [((p + 1) * rows, (p + 2) * rows) for p in sorted(chosen)]
        routes += [Route(lora, start, stop, self.routed.strengths[lora])
                   for lora in self.branches.style_loras for start, stop in spans]
        return Routing(copies * rows, tuple(routes))

    def _contexts(self, context, mine, b, copies):
        """The call's context repeated per branch, the Masker prompt's chunks replaced by each branch's prompt."""
        length = math.lcm(*self.widths, context.shape[1])
        base = fit_tokens(context, length)
        out = []
        for p in range(copies):
            ctx = base.clone()
            branch = fit_tokens(self.branches.contexts[p].to(ctx), length)
            for j in mine:
                ctx[j * b:(j + 1) * b] = branch
            out.append(ctx)
        return torch.cat(out)

    def subject_maps(self, maps: list[torch.Tensor], rows: int, b: int, chunks: list[int], mine: list[int],
                     size) -> list:
        """Per subject: its concept tokens' maps (b, h, w) in its own branch, averaged over the captured
        layers and over the Masker prompt's chunks (and, with attention "both", the unconditional ones)."""
        use = mine + ([j for j, kind in enumerate(chunks) if kind == 1] if self.settings.attention == "both" else [])
        subjects = [self.branches.concept_tokens[p].get(p - 1, []) for p in range(1, len(self.widths))]
        return subject_maps(torch.stack(maps).mean(0), subjects, self.widths, rows, b, use, size)

    def _attention_size(self, x) -> tuple[int, int]:
        h, w = x.shape[-2], x.shape[-1]
        for _ in range(int(math.log2(self.ds_factor))):
            h, w = (h + 1) // 2, (w + 1) // 2
        return h, w

    def _branch_forward(self, executor, call: ModelCall, chunks, mine, b, step):
        copies = len(self.branches.contexts)
        rows = call.rows
        branches = call.copies(copies, context=self._contexts(call.context, mine, b, copies))
        branches = branches.replaced(options=self.with_capture(branches.options))
        self.trace.call_rows.append(rows * copies)
        self.maps = []
        try:
            with self.routed.routed(self.branch_routing(rows, copies)):
                out = branches.run(executor)
            maps = self.maps
        finally:
            self.maps = None
        out = check_finite(out, self.node, self.branch_labels, where=f" at step {step}")
        masks = self._masks(maps, rows, b, chunks, mine, call.x, step)
        outputs = out.reshape(copies, rows, *out.shape[1:])
        if masks is None:  # no mask known yet (see _masks): every branch counts equally
            fused = outputs.mean(0)
        else:
            masks = masks.to(out)
            fused = torch.cat([fuse(outputs[:, j * b:(j + 1) * b], masks) for j in range(len(chunks))])
        return fused, masks

    def _masks(self, maps, rows, b, chunks, mine, x, step):
        """Branch masks (P, b, 1, H, W) for this call: from its own maps when it holds the Masker's prompt;
        otherwise (the host ran the unconditional rows, or another prompt, in a call of their own) the
        masks of this step, or of the latest step that had them; None before any."""
        latent = tuple(x.shape[-2:])
        replace = self.settings.user_masks is not None and self.settings.user_mask_mode == "replace"
        if not mine and not replace:
            return self._latest_masks
        if replace:  # the artist's masks from the first call on, whatever the call holds
            subject = self._drawn(latent, b)
        else:
            size = self._attention_size(x)
            subject = torch.stack([concept_masks(m, self.settings.mask_threshold)
                                   for m in self.subject_maps(maps, rows, b, chunks, mine, size)])
            if self.settings.user_masks is not None:
                found = F.interpolate(subject, size=latent, mode="nearest")
                subject = combine_user_masks(found, self._drawn(latent, b).to(found), self.settings.user_mask_mode)
        masks = branch_masks(subject, latent, self.settings.morphology)
        subject_masks = masks[1:, :, 0].detach()
        subject_masks = subject_masks if subject_masks.is_meta else subject_masks.cpu()
        self.clora_trace.masks[step] = subject_masks
        self._latest_masks = masks
        return masks

    def _drawn(self, size: tuple[int, int], b: int) -> torch.Tensor:
        """The artist's masks at latent ``size`` for ``b`` images: (N, b, h, w) in {0, 1}."""
        drawn = self.settings.user_masks
        n = len(self.branches.subject_loras)
        try:
            check_aspect(tuple(drawn.shape[-2:]), tuple(size))
        except MaskShapeError as e:
            raise CMLoRAError(self.node, "masks", f"{e}.", "draw the masks at the image's size (or the same "
                              "aspect ratio).") from None
        if drawn.shape[0] not in (n, n * b):
            raise CMLoRAError(self.node, "masks", f"{drawn.shape[0]} masks for {n} subject LoRAs and a batch of {b}.",
                              f"give one mask per subject LoRA ({n}), or one per subject and image ({n * b}).")
        return fit_user_masks(drawn, n, b, size)

    def _check_exact(self) -> None:
        if self.sampler_name and self.sampler_name not in EXACT_SAMPLERS:
            raise CMLoRAError(self.node, "step_size",
                              f"contrastive latent updates are exact only with the euler and ddim samplers; this run "
                              f"uses {self.sampler_name.replace('sample_', '')}.",
                              "sample with euler or ddim, or set step_size to 0 to use the masks without updates.")
        keep, gain = host.denoised_affine(self.base_model.model_sampling, 1.0)
        if not (math.isfinite(keep) and math.isfinite(gain)) or gain == 0:
            raise CMLoRAError(self.node, "step_size", "this model's prediction type does not let the sampler follow "
                              "an updated latent (its denoised image does not depend on the prediction).",
                              "set step_size to 0 for this model.")

    def _plain_params(self, unet) -> dict:
        """Weights usable by autograd: plain copies of those created under inference mode (once per run)."""
        if self._grad_params is None:
            self._grad_params = {n: p.detach().clone() for n, p in unet.named_parameters() if p.is_inference()}
        return self._grad_params

    def update_latent(self, unet, x, sigma: float, timesteps, y, options: dict, step: int, iterations: int,
                      extra=None, uncond_context=None):
        """``iterations`` contrastive gradient steps on the latent x (b, C, H, W) at ``sigma``; the new latent.

        Each step runs a loss pass (every branch with its LoRAs, stopped after the last attention
        layer the loss reads) and moves x against the gradient of the NT-Xent loss of the maps.
        ``extra``: the model's further input channels (an inpainting model's mask and masked image),
        passed through unchanged. ``uncond_context``: with attention "both", each branch also runs
        the unconditional prompt and the loss reads the mean of both maps (the reference code).
        """
        copies = len(self.branches.contexts)
        b = x.shape[0]
        groups = 1 if uncond_context is None else 2
        losses = self.clora_trace.losses.setdefault(step, [])
        scale = x_space_step(self.settings.step_size, sigma)
        model_sampling = self.base_model.model_sampling
        widths = self.widths + ([uncond_context.shape[1]] if uncond_context is not None else [])
        length = math.lcm(*widths)
        to_loss = {k: v for k, v in self.with_capture(options).items() if k not in ("wrappers", "callbacks")}
        to_loss["cond_or_uncond"] = ([0] + [1] * (groups - 1)) * copies
        with torch.inference_mode(False), torch.enable_grad():
            # everything autograd touches is made here, outside the executor's inference mode
            per_branch = []
            for c in self.branches.contexts:
                per_branch.append(fit_tokens(c, length).to(x.device).repeat_interleave(b, 0))
                if uncond_context is not None:
                    per_branch.append(fit_tokens(uncond_context.detach().clone(), length).to(x.device))
            ctx = torch.cat(per_branch)
            rest = None if extra is None or extra.shape[1] == 0 else extra.detach().clone()
            params = self._plain_params(unet)
            x = x.detach().clone()
            for _ in range(iterations):
                host.throw_if_interrupted()
                xg = x.clone().requires_grad_(True)
                xin = model_sampling.calculate_input(torch.tensor(sigma, device=x.device), xg)
                xin = xin.to(unet.dtype if hasattr(unet, "dtype") and unet.dtype is not None else xin.dtype)
                if rest is not None:
                    xin = torch.cat([xin, rest.to(xin)], dim=1)
                t = timesteps.detach().clone().repeat(copies * groups)
                yy = None if y is None else y[:b].detach().clone().repeat(copies * groups, 1)
                self.maps, self.loss_pass = [], True
                try:
                    kwargs = {"context": ctx.to(xin.dtype), "transformer_options": dict(to_loss)}
                    if yy is not None:
                        kwargs["y"] = yy.to(xin.dtype)
                    with self.routed.routed(self.branch_routing(b * groups, copies)):
                        torch.func.functional_call(unet, params, (xin.repeat(copies * groups, 1, 1, 1), t), kwargs,
                                                   strict=False)
                except _StopLoss:
                    pass
                finally:
                    maps, self.maps, self.loss_pass = self.maps, None, False
                mean = torch.stack(maps).mean(0)  # (copies * groups * b, h*w, L)
                if groups == 2:  # per branch: the mean of its conditional and unconditional maps
                    mean = mean.reshape(copies, 2, b, *mean.shape[1:]).mean(1).reshape(copies * b, *mean.shape[1:])
                loss = contrastive_loss(mean, self.branches.concept_tokens, self.widths, b, self.settings.temperature)
                grad = torch.autograd.grad(loss, xg)[0]
                losses.append(_value(loss))
                x = (x - scale * grad).detach()
        return x.detach()


def attach_clora(model, loras, branches: Branches, settings: CLoRASettings):
    """A clone of ``model`` that samples with CLoRA (what the Attention Masker node outputs)."""
    layers, ds = attention_layers(model.model.diffusion_model)
    check_routable(model.model, loras, NODE, "CLoRA", input="stack")
    clone = model.clone()
    CLoRARuntime(loras, branches, settings, layers, ds).attach(clone)
    return clone
