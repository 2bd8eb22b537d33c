"""The pack beside the host's own nodes that artists wire around a LoRA stack: ControlNet, FreeU,
Self-Attention Guidance, IPAdapter-style attention patches, area conditioning, inpainting models."""
from __future__ import annotations

import math

import pytest
import torch

import comfy.model_management
import comfy.patcher_extension
import folder_paths
import nodes as host_nodes

from _util import ksample
from comfyui_cmlora.nodes.routed import own_lists
from comfyui_cmlora.nodes.unet_split import capturing, find_split, shallow_forward

CONTROLNET = "cmlora_tiny_sd15_controlnet.safetensors"


def host_node(cls, **inputs):
    """Run a host node whichever API it is written in (the newer host moved many nodes to V3)."""
    if hasattr(cls, "FUNCTION"):
        return getattr(cls(), cls.FUNCTION)(**inputs)
    return cls.execute(**inputs).args


@pytest.fixture(scope="module")
def controlnet(models_dir):
    """A random-weight ControlNet file made now, loaded by the host's ControlNetLoader."""
    import make_fixtures as fx

    folder = models_dir / "controlnet"
    folder.mkdir(exist_ok=True)
    if not fx.is_current(folder / CONTROLNET):
        fx.make_sd15_controlnet(folder / CONTROLNET)
    folder_paths.add_model_folder_path("controlnet", str(folder), is_default=True)
    return host_node(host_nodes.ControlNetLoader, control_net_name=CONTROLNET)[0]


def with_controlnet(conds, controlnet, strength=1.0):
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    pos, neg = host_node(host_nodes.ControlNetApplyAdvanced, positive=conds[0], negative=conds[1],
                         control_net=controlnet, image=hint, strength=strength, start_percent=0.0, end_percent=1.0)
    return pos, neg


def freeu(model):
    from comfy_extras.nodes_freelunch import FreeU

    return host_node(FreeU, model=model, b1=1.3, b2=1.4, s1=0.9, s2=0.2)[0]


class ShallowCheck:
    """A DIFFUSION_MODEL wrapper: on every call the host makes, a full pass capturing the deep feature
    and a shallow pass around it, with the call's ControlNet residuals and patches; both kept."""

    def __init__(self):
        self.pairs, self.indices = [], []
        self._pass, self._record = "full", None  # which pass the attn1 patch is recording, and where

    def __call__(self, executor, x, t, context, y, control, options, **kwargs):
        unet = executor.class_obj
        split = find_split(unet)
        sink, seen = [], {"full": [], "shallow": []}
        self._record = seen
        full = executor(x, t, context, y, own_lists(control), capturing(dict(options), split, sink), **kwargs)
        self._pass = "shallow"
        shallow = shallow_forward(unet, split, x, t, context, y, sink[0], dict(options), own_lists(control))
        self._pass = "full"
        self.pairs.append((full, shallow))
        self.indices.append(seen)
        self._record = None
        return executor(x, t, context, y, control, options, **kwargs)

    def attn1(self, n, context, value, extra_options):
        """An attn1 patch recording which transformer index every output-block layer sees."""
        block = extra_options.get("block")
        if block is not None and block[0] == "output" and self._record is not None:
            self._record[self._pass].append((block[1], extra_options["transformer_index"]))
        return n, context, value

    def attach(self, model):
        m = model.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test-shallow-check", self)
        m.set_model_attn1_patch(self.attn1)
        return m


@pytest.mark.parametrize("with_cn,with_freeu", [(True, False), (False, True), (True, True)])
def test_shallow_pass_with_fresh_deep_feature_equals_full_pass_beside_controlnet_and_freeu(
        sd15, conds, controlnet, with_cn, with_freeu):
    model = freeu(sd15[0]) if with_freeu else sd15[0]
    cond = with_controlnet(conds, controlnet) if with_cn else conds
    check = ShallowCheck()
    ksample(check.attach(model), cond, steps=2)
    assert check.pairs
    for full, shallow in check.pairs:
        assert torch.equal(full, shallow), (full - shallow).abs().max()
    # the residuals and FreeU really act on the outer blocks: dropping them changes the output
    full, _ = check.pairs[0]
    plain = ShallowCheck()
    ksample(plain.attach(sd15[0]), conds, steps=2)
    assert not torch.allclose(full, plain.pairs[0][0], atol=1e-3)


def test_shallow_pass_keeps_the_transformer_index_of_the_full_pass(sd15, conds):
    """Patches keyed by transformer index (GLIGEN's) see the same index in both passes."""
    check = ShallowCheck()
    ksample(check.attach(sd15[0]), conds, steps=1)
    for seen in check.indices:
        split = find_split(sd15[0].model.diffusion_model)
        expected = [(b, i) for b, i in seen["full"] if b >= split.out_start]
        assert expected and seen["shallow"] == expected


# ------------------------------------------------------------------ CLoRA beside other nodes

from _util import Recorder, stack  # noqa: E402
from test_clora import masker, negative  # noqa: E402

from comfyui_cmlora.cmlora_core.clora import morphology  # noqa: E402
from comfyui_cmlora.cmlora_core.errors import CMLoRAError  # noqa: E402
from comfyui_cmlora.nodes.runtime import runtime_of  # noqa: E402


class IPAdapterStylePatch:
    """An attn2 replace patch as ComfyUI_IPAdapter_plus makes them: text attention plus an added image
    term, counting its calls; a second registration on its key calls ``set_new_condition``."""

    def __init__(self, weight=0.5):
        self.weight, self.conditions, self.calls = weight, 1, []

    def set_new_condition(self, **kwargs):
        self.conditions += 1

    def __deepcopy__(self, memo):  # the host copies model_options on clone; the test counts on one object
        return self

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        self.calls.append((extra_options["block"][0], extra_options["block"][1], extra_options.get("block_index", 0)))
        return optimized_attention(q, k, v, extra_options["n_heads"]) + self.weight * q.tanh()


def register_like_ipadapter(model, patch, key):
    """IPAdapter_plus's set_model_patch_replace, step by step: it edits the patcher's model_options."""
    to = model.model_options["transformer_options"]
    to.setdefault("patches_replace", {}).setdefault("attn2", {})
    if key not in to["patches_replace"]["attn2"]:
        to["patches_replace"]["attn2"][key] = patch
    else:
        to["patches_replace"]["attn2"][key].set_new_condition(weight=patch.weight)


def test_ipadapter_patch_registered_before_the_masker_keeps_running_inside_clora(sd15_narrow):
    base = sd15_narrow[0].clone()
    patch = IPAdapterStylePatch()
    unet = base.model.diffusion_model
    keys = [("input", i) for i, blk in enumerate(unet.input_blocks) if any(hasattr(m, "transformer_blocks") for m in blk)]
    keys += [("output", i) for i, blk in enumerate(unet.output_blocks) if any(hasattr(m, "transformer_blocks") for m in blk)]
    for key in keys:  # SD1.5: IPAdapter's keys are (block, index)
        register_like_ipadapter(base, patch, key)
    model, positive = masker((base, *sd15_narrow[1:]), extra_iterations=1)
    out = ksample(model, (positive, negative(sd15_narrow)), steps=2)
    runtime = runtime_of(model)
    # CLoRA's target layers ran the IPAdapter patch (it was skipped there before), and CLoRA got its maps
    seen = {(b, i) for b, i, _ in patch.calls}
    assert {(b, i) for b, i, _ in runtime.layers} <= seen and set(keys) == seen
    assert runtime.last_clora.masks and runtime.last_clora.losses
    plain, positive = masker(sd15_narrow, extra_iterations=1)
    assert not torch.allclose(out, ksample(plain, (positive, negative(sd15_narrow)), steps=2), atol=1e-3)


def test_ipadapter_patch_registered_after_the_masker_on_its_keys(sd15_narrow):
    model, positive = masker(sd15_narrow, extra_iterations=1)
    model = model.clone()
    patch = IPAdapterStylePatch()
    targets = runtime_of(model).layers
    for key in targets:  # SDXL-style keys (block, index, transformer): the very keys CLoRA reads
        register_like_ipadapter(model, patch, key)
    out = ksample(model, (positive, negative(sd15_narrow)), steps=2)
    assert torch.isfinite(out).all() and patch.conditions == 1
    assert set(patch.calls) == set(targets)
    assert runtime_of(model).last_clora.masks


def test_self_attention_guidance_calls_without_the_prompt_use_the_steps_masks(sd15_narrow):
    """SAG evaluates the blurred unconditional rows in a call of their own (labelled as conditional:
    the host numbers the conds it is given); they hold no concept, so they take the step's masks."""
    from comfy_extras.nodes_sag import SelfAttentionGuidance

    model, positive = masker(sd15_narrow, extra_iterations=1)
    sag = host_node(SelfAttentionGuidance, model=model, scale=0.5, blur_sigma=2.0)[0]
    inner = Recorder()
    sag = inner.attach(sag)
    out = ksample(sag, (positive, negative(sd15_narrow)), steps=3)
    assert torch.isfinite(out).all()
    runtime = runtime_of(sag)
    copies = len(runtime.branches.contexts)
    own = [c for c in inner.calls if c["x"].shape[0] == copies]
    assert len(own) == 3  # SAG's own call, one per step
    neg = negative(sd15_narrow)[0][0]
    for c in own:  # its prompt (the negative one) is left as it is in every branch
        assert all(torch.equal(c["context"][p, :neg.shape[1]], neg[0].to(c["context"])) for p in range(copies))
    assert sorted(runtime.last_clora.masks) == [0, 1, 2]


def test_unconditional_rows_in_a_call_of_their_own(sd15_narrow, monkeypatch):
    """When memory is short the host runs the conds one at a time, the unconditional rows first;
    that call holds no concept, so CLoRA uses the latest masks (none yet at the first step: every
    branch counts equally there)."""
    import comfy.model_management

    real = comfy.model_management.get_free_memory

    def short(dev=None, torch_free_too=False):  # what calc_cond_batch asks when sizing its batches
        return real(dev, torch_free_too) if torch_free_too else 0

    monkeypatch.setattr(comfy.model_management, "get_free_memory", short)
    model, positive = masker(sd15_narrow, extra_iterations=1)
    inner = Recorder()
    recorded = inner.attach(model)
    out = ksample(recorded, (positive, negative(sd15_narrow)), steps=3)
    assert torch.isfinite(out).all()
    kinds = [set(c["cond_or_uncond"]) for c in inner.calls]
    assert kinds == [{1}, {0}] * 3  # really split, the unconditional rows first
    run = runtime_of(recorded).last_clora
    assert sorted(run.masks) == [0, 1, 2] and run.losses


def _combine(a, b):
    return host_node(host_nodes.ConditioningCombine, conditioning_1=a, conditioning_2=b)[0]


def test_other_prompts_beside_the_maskers_keep_their_own_context_in_every_branch(sd15_narrow):
    clip = sd15_narrow[1]
    model, positive = masker(sd15_narrow, step_size=0.0)
    other = clip.encode_from_tokens_scheduled(clip.tokenize("a red car on a road"))
    inner = Recorder()
    recorded = inner.attach(model)  # registered after CLoRA: sees the branch copies
    ksample(recorded, (_combine(positive, other), negative(sd15_narrow)), steps=2)
    copies = len(runtime_of(recorded).branches.contexts)
    base, theirs = positive[0][0], other[0][0]
    kept = 0
    for call in inner.calls:
        kinds = call["cond_or_uncond"]
        n = len(kinds) // copies
        b = call["x"].shape[0] // len(kinds)
        ctx = call["context"].reshape(copies, n, b, *call["context"].shape[1:])
        cond = [j for j in range(n) if kinds[j] == 0]
        assert len(cond) == 2
        is_other = [all(torch.equal(ctx[p, j, 0, :theirs.shape[1]], theirs[0].to(ctx)) for p in range(copies))
                    for j in cond]
        varies = [not all(torch.equal(ctx[p, j, 0], ctx[0, j, 0]) for p in range(copies)) for j in cond]
        assert sorted(is_other) == [False, True] and sorted(varies) == [False, True]  # one each
        assert all(o != v for o, v in zip(is_other, varies))
        assert torch.equal(ctx[0, cond[is_other.index(False)], 0, :base.shape[1]], base[0].to(ctx))
        kept += 1
    assert kept == 2  # both steps


def test_area_prompt_beside_clora_is_refused_naming_the_fix(sd15_narrow):
    clip = sd15_narrow[1]
    model, positive = masker(sd15_narrow, step_size=0.0)
    other = clip.encode_from_tokens_scheduled(clip.tokenize("a red car"))
    area = host_node(host_nodes.ConditioningSetArea, conditioning=other, width=32, height=32, x=0, y=0, strength=1.0)[0]
    with pytest.raises(CMLoRAError, match=r"CLoRA Attention Masker.*Conditioning \(Set Area\).*Conditioning \(Set Mask\)"):
        ksample(model, (_combine(positive, area), negative(sd15_narrow)), steps=2)
    # the failed run left the model usable
    assert torch.isfinite(ksample(model, (positive, negative(sd15_narrow)), steps=2)).all()


@pytest.fixture(scope="module")
def inpainting(models_dir):
    """A 9-channel (inpainting-layout) SD1.5 checkpoint made now, through CheckpointLoaderSimple."""
    import make_fixtures as fx

    name = "cmlora_tiny_sd15_inpainting.safetensors"
    path = models_dir / "checkpoints" / name
    if not fx.is_current(path):
        fx.make_sd15_checkpoint(path, seed=3, in_channels=9)
    return host_node(host_nodes.CheckpointLoaderSimple, ckpt_name=name)


def test_clora_on_an_inpainting_checkpoint_updates_only_the_latent_channels(inpainting):
    model, clip, vae = inpainting
    assert model.model.diffusion_model.in_channels == 9
    # LoRAs at the checkpoint's width (the masker's usual ones are the narrow twin's)
    wide = stack({"lora_name": "test_kohya.safetensors", "category": "character", "concept": "cat", "trigger": "sks"},
                 {"lora_name": "test_peft.safetensors", "category": "object", "concept": "dog", "trigger": "zwx"})
    masked, positive = masker((model, clip, vae), st=wide, extra_iterations=1)
    pixels = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1.0
    pos, neg, lat = host_node(host_nodes.InpaintModelConditioning, positive=positive,
                              negative=negative((model, clip, vae)), vae=vae, pixels=pixels, mask=mask,
                              **({"noise_mask": True} if "noise_mask" in host_nodes.InpaintModelConditioning.INPUT_TYPES()["required"] else {}))
    inner = Recorder()
    recorded = inner.attach(masked)
    ksample(recorded, (pos, neg), steps=3)
    run = runtime_of(recorded).last_clora
    assert run.losses and all(len(v) for v in run.losses.values())
    extra = [c["x"][:, 4:] for c in inner.calls]
    assert all(torch.equal(e, extra[0][:1].expand_as(e)) for e in extra)  # mask + masked image, never updated


def test_sdxl_loss_passes_read_the_prompts_adm_vector(sdxl):
    from comfyui_cmlora.nodes.clora_runtime import Branches, CLoRASettings, attach_clora
    from comfyui_cmlora.nodes.loras import map_model_lora
    from comfyui_cmlora.cmlora_core.stack import require_model_entries

    model = sdxl
    g = torch.Generator().manual_seed(4)
    contexts = [torch.randn(1, 77, 2048, generator=g) for _ in range(3)]
    import shutil
    import folder_paths as fp

    second = "test_sdxl_kohya_copy.safetensors"
    shutil.copyfile(fp.get_full_path("loras", "test_sdxl_kohya.safetensors"),
                    fp.get_folder_paths("loras")[0] + "/" + second)
    entries = list(require_model_entries(stack(("test_sdxl_kohya.safetensors", 1.0), (second, 0.5)), "test"))
    mapped = [map_model_lora(model, e, "test") for e in entries]
    tokens = [{0: [2], 1: [5]}, {0: [1, 2], 1: [5]}, {0: [2], 1: [4, 5]}]
    branches = Branches(contexts, tokens, [0, 1], [], ["cat", "dog"])
    patched = attach_clora(model, mapped, branches, CLoRASettings(extra_iterations=1))
    outer = Recorder()
    patched = outer.attach(patched, "outer-before")  # registered last, still outside? record y per call
    pos = [[contexts[0], {"pooled_output": torch.randn(1, 1280, generator=g), "width": 64, "height": 64}]]
    neg = [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g),
                                                    "width": 64, "height": 64}]]
    seen = []
    unet = model.model.diffusion_model
    hook = unet.label_emb.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach().clone()) if torch.is_grad_enabled() else None)
    try:
        ksample(patched, (pos, neg), steps=2)
    finally:
        hook.remove()
    assert seen, "no loss pass ran"
    cond_y = []
    for c in outer.calls:
        kinds = c["cond_or_uncond"]
        n = c["x"].shape[0] // len(kinds)
        rows = c["y"].reshape(-1, n, c["y"].shape[-1])
        cond_y += [rows[j] for j, k in enumerate(kinds) if k == 0]
    prompt_y = cond_y[0][0]
    for y in seen:
        assert all(torch.allclose(row.float(), prompt_y.float(), atol=1e-3) for row in y)


def test_trigger_words_join_their_concepts_group(sd15_narrow):
    from comfyui_cmlora.nodes.clora_nodes import build_branches

    clip = sd15_narrow[1]
    st = stack({"lora_name": "test_kohya_narrow.safetensors", "concept": "cat", "trigger": "sks", "category": "character"},
               {"lora_name": "test_peft_narrow.safetensors", "concept": "dog", "trigger": "fluffy", "category": "object"})
    from comfyui_cmlora.cmlora_core.stack import require_model_entries

    entries = list(require_model_entries(st, "test"))
    texts, _, tokens, _ = build_branches(clip, "a cat and a dog", entries, [])
    assert texts[1:] == ["a sks cat and a dog", "a cat and a fluffy dog"]
    # by hand: "<start> a cat and a dog": cat 2, dog 5; "a sks cat and a dog": sks 2, cat 3, dog 6;
    # "a cat and a fluffy dog": cat 2, fluffy 5, dog 6 — the trigger joins its own concept's group only
    assert tokens[0] == {0: [2], 1: [5]}
    assert tokens[1] == {0: [2, 3], 1: [6]}
    assert tokens[2] == {0: [2], 1: [5, 6]}


def test_attention_both_enters_the_loss(sd15_narrow):
    losses = {}
    for attention in ("conditional", "both"):
        model, positive = masker(sd15_narrow, extra_iterations=1, attention=attention)
        ksample(model, (positive, negative(sd15_narrow)), steps=2, seed=9)
        losses[attention] = runtime_of(model).last_clora.losses[0][0]
    assert losses["conditional"] != pytest.approx(losses["both"], rel=1e-4)


def test_style_inside_chosen_subjects_only(sd15_narrow):
    st = stack({"lora_name": "test_kohya_narrow.safetensors", "concept": "cat", "trigger": "sks", "category": "character"},
               {"lora_name": "test_peft_narrow.safetensors", "concept": "dog", "trigger": "zwx", "category": "object"},
               {"lora_name": "test_locon_narrow.safetensors", "category": "style", "strength_model": 0.7})
    model, _ = masker(sd15_narrow, st=st, style_scope="subjects", style_subjects="dog")
    routing = runtime_of(model).branch_routing(2, 3)
    # by hand: copy 0 base (rows 0-1), copy 1 cat (rows 2-3), copy 2 dog (rows 4-5); style (LoRA 2) with the dog only
    assert sorted((r.lora, r.start, r.stop, r.weight) for r in routing.routes) == \
        [(0, 2, 4, 1.0), (1, 4, 6, 1.0), (2, 4, 6, 0.7)]
    everywhere, _ = masker(sd15_narrow, st=st, style_scope="subjects")
    assert sorted((r.lora, r.start, r.stop) for r in runtime_of(everywhere).branch_routing(2, 3).routes) == \
        [(0, 2, 4), (1, 4, 6), (2, 2, 4), (2, 4, 6)]
    with pytest.raises(CMLoRAError, match="style_subjects.*'bird' is not the concept"):
        masker(sd15_narrow, st=st, style_scope="subjects", style_subjects="bird")
    with pytest.raises(CMLoRAError, match="style_scope"):
        masker(sd15_narrow, st=st, style_scope="global", style_subjects="dog")


def test_mask_morphology_applies_3x3_to_each_subjects_mask(sd15_narrow):
    masks = {}
    for op in ("none", "dilate"):
        model, positive = masker(sd15_narrow, step_size=0.0, mask_morphology=op, mask_threshold=0.99)
        ksample(model, (positive, negative(sd15_narrow)), steps=1, seed=4)
        masks[op] = runtime_of(model).last_clora.masks[0]
    assert torch.equal(masks["dilate"], morphology(masks["none"], "dilate"))
    assert not torch.equal(masks["dilate"], masks["none"])


def _reference_nt_xent(items, concept, temperature=0.5):
    """pytorch-metric-learning's NTXentLoss on min-max normalised maps, by loops."""
    z = []
    for m in items:
        m = (m - m.min()) / (m.max() - m.min())
        z.append(m / m.norm())
    s = [[float(a @ b) / temperature for b in z] for a in z]
    pairs = []
    for a in range(len(z)):
        for p in range(len(z)):
            if a != p and concept[a] == concept[p]:
                neg = sum(math.exp(s[a][n]) for n in range(len(z)) if concept[n] != concept[a])
                pairs.append(-math.log(math.exp(s[a][p]) / (math.exp(s[a][p]) + neg)))
    return sum(pairs) / len(pairs)


def test_attention_both_loss_is_the_mean_of_conditional_and_unconditional_maps(sd15_narrow):
    """The first loss of a run with attention 'both', recomputed here: each branch's LoraLoader model
    on the sampler's first input with the branch prompt and the negative prompt, maps captured by a
    plain attn2 patch, averaged over heads, layers and the two prompts, then NT-Xent by loops."""
    from comfy.ldm.modules.attention import optimized_attention
    from _util import lora_loader
    from test_clora import CAT, DOG, STYLE

    outer = Recorder()
    base = outer.attach(sd15_narrow[0])
    model, positive = masker((base, *sd15_narrow[1:]), extra_iterations=0, attention="both")
    neg = negative(sd15_narrow)
    ksample(model, (positive, neg), steps=2, seed=9)
    runtime = runtime_of(model)
    ours = runtime.last_clora.losses[0][0]
    first = outer.calls[0]
    kinds = first["cond_or_uncond"]
    x, t = first["x"][kinds.index(0):kinds.index(0) + 1], first["t"][:1]
    targets = set(runtime.layers)
    per_branch = []
    for p, extra in enumerate([[], [(CAT, 1.0)], [(DOG, 1.0)]]):
        branch_model = lora_loader(sd15_narrow[0], (STYLE, 1.0), *extra)
        maps = []

        def capture(q, k, v, extra_options, maps=maps):
            key = (extra_options["block"][0], extra_options["block"][1], extra_options.get("block_index", 0))
            if key in targets:
                h = extra_options["n_heads"]
                qh = q.reshape(q.shape[0], q.shape[1], h, -1).transpose(1, 2).float()
                kh = k.reshape(k.shape[0], k.shape[1], h, -1).transpose(1, 2).float()
                maps.append((qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5).softmax(-1).mean(1))
            return optimized_attention(q, k, v, extra_options["n_heads"])

        options = {"patches_replace": {"attn2": {key: capture for key in targets}}}
        call = {"x": x.repeat(2, 1, 1, 1), "t": t.repeat(2), "y": None,
                "context": torch.cat([runtime.branches.contexts[p], neg[0][0]])}
        with torch.no_grad():
            comfy.model_management.load_models_gpu([branch_model])
            branch_model.model.diffusion_model(call["x"], call["t"], context=call["context"],
                                               transformer_options=options)
        m = torch.stack(maps).mean(0)  # (2 rows: prompt, negative; h*w; tokens)
        per_branch.append((m[0] + m[1]) / 2)
    items, concept = [], []
    for p, by_concept in enumerate(runtime.branches.concept_tokens):
        for c, positions in by_concept.items():
            for tok in positions:
                items.append(per_branch[p][:, tok])
                concept.append(c)
    expected = _reference_nt_xent(items, concept)
    assert ours == pytest.approx(expected, rel=1e-5), (ours, expected)
