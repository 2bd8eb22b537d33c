"""CLoRA on the real host: updates change the trajectory exactly, masks, fusion, bad input."""
from __future__ import annotations

import pytest
import torch


from _util import ksample, lora_loader, stack

from comfyui_cmlora.cmlora_core.errors import CMLoRAError
from comfyui_cmlora.nodes.clora_nodes import AttentionMasker, MaskOutput
from comfyui_cmlora.nodes.runtime import runtime_of

CAT, DOG, STYLE = "test_kohya_narrow.safetensors", "test_peft_narrow.safetensors", "test_locon_narrow.safetensors"
PROMPT = "a photo of a cat and a dog in a garden"


def subjects(style=True, cat="cat", dog="dog"):
    specs = [{"lora_name": CAT, "category": "character", "concept": cat, "trigger": "sks"},
             {"lora_name": DOG, "category": "object", "concept": dog, "trigger": "zwx"}]
    if style:
        specs.append({"lora_name": STYLE, "category": "style"})
    return stack(*specs)


def masker(models, st=None, prompt=PROMPT, **kw):
    model, clip, _ = models
    args = dict(temperature=0.5, step_size=20.0, stop_fraction=0.5, extra_iterations=2, mask_threshold=0.4,
                attention="conditional", style_scope="global")
    args.update(kw)
    return AttentionMasker.execute(model=model, clip=clip, stack=st or subjects(), prompt=prompt, **args).args


def negative(models):
    clip = models[1]
    return clip.encode_from_tokens_scheduled(clip.tokenize(""))


def test_smoke_masks_and_loss(sd15_narrow):
    model, positive = masker(sd15_narrow)
    out = ksample(model, (positive, negative(sd15_narrow)), steps=4, sampler="euler")
    assert torch.isfinite(out).all()
    run = runtime_of(model).last_clora
    assert sorted(run.masks) == [0, 1, 2, 3]
    assert run.masks[3].shape == (2, 1, 8, 8)
    # T = 4: the extra iterations at 0% and 10% of the steps both land on step 0, 20% on step 1
    assert [len(run.losses[i]) for i in sorted(run.losses)] == [5, 3]
    masks, overlay = MaskOutput.execute(model=model, samples={"samples": out}, step=-1).args
    assert masks.shape == (2, 64, 64) and overlay.shape == (1, 64, 64, 3)


def test_update_lowers_the_loss_on_the_model(sd15_narrow):
    model, positive = masker(sd15_narrow, step_size=0.02, extra_iterations=3)
    ksample(model, (positive, negative(sd15_narrow)), steps=4, sampler="euler")
    losses = runtime_of(model).last_clora.losses[0]
    assert losses[1] < losses[0]


def _overlap(run):
    """Mean IoU of the two subjects' masks over the steps."""
    ious = []
    for m in run.masks.values():
        a, b = m[0] > 0, m[1] > 0
        union = (a | b).sum()
        ious.append(float((a & b).sum()) / float(union) if union else 0.0)
    return sum(ious) / len(ious)


def test_updates_separate_the_concepts_masks(sd15_narrow):
    import comfy.sample

    overlaps = {}
    lat = torch.zeros(1, 4, 32, 32)  # 8x8 attention cells at 1/32 of 256 px
    noise = comfy.sample.prepare_noise(lat, 7)
    for size in (0.0, 20.0):
        model, positive = masker(sd15_narrow, step_size=size, extra_iterations=5, mask_threshold=0.8)
        comfy.sample.sample(model, noise, 6, 5.0, "euler", "normal", positive, negative(sd15_narrow), lat, seed=7,
                            disable_pbar=True)
        run = runtime_of(model).last_clora
        overlaps[size] = _overlap(run)
    # on this random-weight model the effect is small (about 4% IoU) but deterministic
    assert overlaps[20.0] < overlaps[0.0], overlaps


def _branch_weights(models, branches: list[list[str]]) -> list[dict]:
    """The diffusion model's weights with each branch's LoRAs merged by the host's own LoraLoader
    (strength 1, as the stack gives them), one state dict per branch."""
    import comfy.model_management

    out = []
    for names in branches:
        m = lora_loader(models[0], *[(n, 1.0) for n in names])
        comfy.model_management.load_models_gpu([m])
        out.append({k: v.detach().clone() for k, v in m.model.diffusion_model.state_dict().items()})
    comfy.model_management.unload_all_models()  # the base model's own weights back in place
    return out


def _hand_attention(maps: list, tokens: int):
    """An attn2 replace patch: softmax(q k^T / sqrt(d)) per head, written out here; keeps the
    head-averaged probabilities of the cross-attention layers with ``tokens`` image tokens (1/32 of the
    image), outside the middle block."""
    def patch(q, k, v, extra_options):
        heads = extra_options["n_heads"]
        b, n, c = q.shape
        d = c // heads
        qh, kh, vh = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        probs = torch.softmax(qh.float() @ kh.float().transpose(-1, -2) / d ** 0.5, dim=-1)
        if n == tokens and extra_options["block"][0] != "middle":
            maps.append(probs.mean(1))
        return (probs.to(vh.dtype) @ vh).transpose(1, 2).reshape(b, n, c)
    return patch


def _reference_euler(unet, weights, model_sampling, contexts, concept_tokens, plan, step_size):
    """A plain Euler loop that moves the latent before each planned step, computed without the pack's
    runtime: at x, each branch's model (the host's LoraLoader merge of its LoRAs) reads its own prompt;
    the loss is NT-Xent (tested by hand in tests/core) over the layer-averaged cross-attention maps of
    every branch's concept tokens; x moves against its gradient by step_size * (1 + sigma^2) (the
    reference's step on z = x / sqrt(1 + sigma^2)). Then the guided model predicts at the moved latent."""
    from comfyui_cmlora.cmlora_core.clora import nt_xent

    keys = [(kind, i) for kind, blocks in (("input", unet.input_blocks), ("output", unet.output_blocks))
            for i in range(len(blocks))]

    @torch.no_grad()
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            sigma = float(sigmas[i])
            for _ in range(plan.get(i, 0)):
                with torch.inference_mode(False), torch.enable_grad():
                    xg = x.detach().clone().requires_grad_(True)
                    xin = model_sampling.calculate_input(sigmas[i], xg)
                    t = model_sampling.timestep(sigmas[i] * s_in).float()
                    per_branch = []
                    for params, ctx in zip(weights, contexts):
                        maps = []
                        patch = _hand_attention(maps, (x.shape[-2] // 4) * (x.shape[-1] // 4))
                        options = {"patches_replace": {"attn2": {key: patch for key in keys}}}
                        torch.func.functional_call(unet, params, (xin, t),
                                                   {"context": ctx.to(xin), "transformer_options": options})
                        per_branch.append(torch.stack(maps).mean(0)[0])  # (h*w, tokens)
                    items = [per_branch[p][:, t] for p, by in enumerate(concept_tokens) for ts in by.values() for t in ts]
                    concept = [c for by in concept_tokens for c, ts in by.items() for _ in ts]
                    loss = nt_xent(torch.stack(items), concept, 0.5)
                    grad = torch.autograd.grad(loss, xg)[0]
                x = (x - step_size * (1.0 + sigma * sigma) * grad).detach()
            denoised = model(x, sigmas[i] * s_in, **extra_args)
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x

    return sample


@pytest.mark.parametrize("sampler, prediction", [("euler", "eps"), ("ddim", "eps"), ("euler", "v_prediction")])
def test_latent_update_changes_the_trajectory_exactly(sd15_narrow, sampler, prediction):
    """The sampler follows the updated latents: against a reference loop that moves the latent itself,
    from the host's LoraLoader merges and a hand-written attention (the branches' prompts and concept
    tokens are the Masker's, read from its runtime). Also on the model made a v-prediction one by the
    host's ModelSamplingDiscrete node (the way v-prediction checkpoints are sampled): the host turns a
    v output into the denoised image with its own latent, so the correction differs from epsilon's."""
    from comfy_extras import nodes_custom_sampler as cs
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
    import comfy.samplers as samplers
    from comfyui_cmlora.cmlora_core.clora import update_plan

    neg = negative(sd15_narrow)
    steps = 4
    models = sd15_narrow
    if prediction != "eps":
        models = (ModelSamplingDiscrete().patch(sd15_narrow[0], prediction, False)[0], *sd15_narrow[1:])
    model, positive = masker(models, extra_iterations=1)
    ours = ksample(model, (positive, neg), steps=steps, sampler=sampler, seed=5)
    ref_model, _ = masker(models, extra_iterations=1, step_size=0.0)  # the same forward, no updates
    branches = runtime_of(ref_model).branches
    assert len(branches.contexts) == 3  # the base prompt, the cat's, the dog's; the style on every branch
    weights = _branch_weights(sd15_narrow, [[STYLE], [CAT, STYLE], [DOG, STYLE]])
    plan = update_plan(steps, 0.5, 1)
    unet = sd15_narrow[0].model.diffusion_model
    reference = _reference_euler(unet, weights, sd15_narrow[0].model.model_sampling, branches.contexts,
                                 branches.concept_tokens, plan, 20.0)
    guider = cs.CFGGuider.execute(ref_model, positive, neg, 5.0).args[0]
    sigmas = cs.BasicScheduler.execute(ref_model, "normal", steps, 1.0).args[0]
    noise = cs.RandomNoise.execute(5).args[0]
    ref = cs.SamplerCustomAdvanced.execute(noise, guider, samplers.KSAMPLER(reference), sigmas,
                                           {"samples": torch.zeros(1, 4, 8, 8)}).args[0]
    no_update = ksample(ref_model, (positive, neg), steps=steps, sampler=sampler, seed=5)
    scale = float(ref["samples"].abs().max())
    effect = float((ours - no_update).abs().max()) / scale
    error = float((ours - ref["samples"]).abs().max()) / scale
    assert effect > 1e-3  # the updates matter ...
    # ... and the sampler followed them: float32 rounding only, which the update's gradient step
    # amplifies with the effect; a step whose update the sampler lost or took twice is off by a large
    # part of the effect itself
    assert error < 1e-3 * effect, (error, effect)


def test_other_samplers_are_refused_with_updates(sd15_narrow):
    model, positive = masker(sd15_narrow)
    with pytest.raises(CMLoRAError, match="euler and ddim"):
        ksample(model, (positive, negative(sd15_narrow)), steps=3, sampler="euler_ancestral")
    masks_only, positive = masker(sd15_narrow, step_size=0.0)
    assert torch.isfinite(ksample(masks_only, (positive, negative(sd15_narrow)), steps=2, sampler="dpmpp_2m")).all()


def test_non_square_and_batch_two(sd15_narrow):
    import comfy.sample

    model, positive = masker(sd15_narrow, extra_iterations=0)
    lat = torch.zeros(2, 4, 8, 16)
    noise = comfy.sample.prepare_noise(lat, 3)
    out = comfy.sample.sample(model, noise, 3, 5.0, "euler", "normal", positive, negative(sd15_narrow), lat, seed=3,
                              disable_pbar=True)
    assert out.shape == (2, 4, 8, 16) and torch.isfinite(out).all()
    run = runtime_of(model).last_clora
    assert run.masks[2].shape == (2, 2, 8, 16)


def test_masks_keep_rows_and_columns_on_non_square_maps(sd15_narrow):
    """A token attending only to the top-right attention cell gives a top-right mask."""
    model, _ = masker(sd15_narrow)
    runtime = runtime_of(model)
    h, w = 2, 4
    copies, rows, b = 3, 2, 1
    length = 77
    maps = torch.full((copies * rows, h * w, length), 0.01)
    for p in range(1, copies):
        for t in runtime.branches.concept_tokens[p][p - 1]:
            maps[p * rows, :, t] = 0.0
            maps[p * rows, w - 1, t] = 1.0  # row 0, last column
    per_subject = runtime.subject_maps([maps], rows, b, [0, 1], [0], (h, w))
    a = per_subject[0][0][0]
    assert a.shape == (h, w) and float(a[0, w - 1]) == 1.0 and float(a[1, 0]) == 0.0


def test_bad_input(sd15_narrow):
    with pytest.raises(CMLoRAError, match=r"concept 'dog'.*not in the prompt 'a cat in a garden'"):
        masker(sd15_narrow, prompt="a cat in a garden")
    with pytest.raises(CMLoRAError, match="has no concept words"):
        masker(sd15_narrow, st=subjects(dog=""))
    st = stack({"lora_name": "test_loha_narrow.safetensors", "category": "character", "concept": "cat"},
               {"lora_name": DOG, "category": "object", "concept": "dog"})
    model, positive = masker(sd15_narrow, st=st)  # LoHa has no text-encoder weights: still works (logged)
    assert torch.isfinite(ksample(model, (positive, negative(sd15_narrow)), steps=2)).all()


def test_prompt_longer_than_one_chunk(sd15_narrow):
    long_prompt = "a photo of a cat and a dog, " + ", ".join(["highly detailed"] * 40)
    model, positive = masker(sd15_narrow, prompt=long_prompt, extra_iterations=0)
    assert positive[0][0].shape[1] > 77
    assert torch.isfinite(ksample(model, (positive, negative(sd15_narrow)), steps=2)).all()


def test_updates_work_inside_the_executors_inference_mode(sd15_narrow):
    """The host runs nodes and samplers under torch.inference_mode(); gradients must still flow."""
    with torch.inference_mode():
        model, positive = masker(sd15_narrow, extra_iterations=1)
        out = ksample(model, (positive, negative(sd15_narrow)), steps=2, sampler="euler")
    assert torch.isfinite(out).all()
    assert runtime_of(model).last_clora.losses[0]
