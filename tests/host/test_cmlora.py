"""CMLoRA on the real host: cache invariant, weighted composite, pass counts, profiler, bad input."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import comfy.lora
import comfy.model_management

from _util import Recorder, apply, diffusion_out, ksample, lora_loader, real_pass_flops, stack, stepwise_reference

from comfyui_cmlora.cmlora_core.cmlora import FULL, SHALLOW, Planner
from comfyui_cmlora.cmlora_core.errors import CMLoRAError
from comfyui_cmlora.nodes.apply_nodes import ApplyNode, SamplerNode
from comfyui_cmlora.nodes.cmlora_nodes import LoadProfile, ProfilerNode, SaveProfile, SchedulerNode
from comfyui_cmlora.nodes.unet_split import capture_patch, find_split, shallow_forward
from comfyui_cmlora.nodes.runtime import runtime_of

A, B, C = "test_kohya_narrow.safetensors", "test_locon_narrow.safetensors", "test_peft_narrow.safetensors"
CATS = {A: "character", B: "background", C: "style"}


def cat_stack(*names, strength=1.0):
    return stack(*[{"lora_name": n, "strength_model": strength, "category": CATS.get(n, "auto")} for n in names])


def schedule(st=None, profile=None, **kw):
    args = dict(mode="offline", switch_interval=2, cache="deep", refresh="uniform", refresh_interval=2,
                h_to_l_fraction=0.55, online_threshold=0.5, w_dom="constant", dominant_full=True, preview_steps=8)
    args.update(kw)
    return SchedulerNode.execute(profile=profile, stack=st, **args).args


def cmlora(model, st, sched):
    return ApplyNode.execute(model=model, stack=st, method="cmlora", switch_interval=2, schedule=sched).args[0]


def _check_shallow_invariant(model, x, t, context, y=None):
    comfy.model_management.load_models_gpu([model])
    unet = model.model.diffusion_model
    split = find_split(unet)
    sink = []
    kwargs = {} if y is None else {"y": y}
    with torch.no_grad():
        full = unet(x, t, context=context, transformer_options={"patches": {"output_block_patch": [capture_patch(split, sink)]}}, **kwargs)
        shallow = shallow_forward(unet, split, x, t, context, y, sink[0], {})
    assert torch.equal(full, shallow)
    return split, sink[0]


def test_shallow_pass_with_fresh_deep_feature_equals_full_pass(sd15_narrow):
    torch.manual_seed(0)
    split, deep = _check_shallow_invariant(sd15_narrow[0], torch.randn(2, 4, 8, 8), torch.tensor([500.0, 20.0]),
                                           torch.randn(2, 77, 768))
    # derived from the structure: the first level's blocks, and the deep map (the second level's
    # twice-as-wide channels: 128 on the narrow twin) entering them
    assert (split.n_in, split.out_start) == (2, 4) and deep.shape == (2, 128, 8, 8)


def test_shallow_invariant_on_sdxl(sdxl):
    model = sdxl
    torch.manual_seed(0)
    _check_shallow_invariant(model, torch.randn(1, 4, 8, 8), torch.tensor([300.0]), torch.randn(1, 77, 2048),
                             torch.randn(1, 2816))


@pytest.mark.parametrize("settings", [dict(cache="none"), dict(cache="deep", refresh_interval=1)])
def test_without_caching_cmlora_is_the_weighted_composite(sd15_narrow, conds, settings):
    model = sd15_narrow[0]
    names, strengths = [A, B, C], [1.0, 0.8, 0.9]
    st = stack(*[{"lora_name": n, "strength_model": s, "category": CATS[n]} for n, s in zip(names, strengths)])
    sched = schedule(st, **settings)[0]
    outer = Recorder()
    patched = cmlora(outer.attach(model), st, sched)
    ksample(patched, conds, steps=4)
    trace = runtime_of(patched).last_trace
    assert trace.shallow_passes == 0 and trace.full_passes == 3 * trace.model_calls
    refs = [lora_loader(model, (n, s)) for n, s in zip(names, strengths)]
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 4).tolist()
    for call in outer.calls:
        step = max(i for i, s in enumerate(sigmas[:-1]) if s >= call["sigma"] * (1 - 1e-5))
        w = trace.plans[step].weights
        n = 3
        dom = trace.plans[step].dominant
        assert w[dom] == pytest.approx((n - 0.5) / (2 * n - 1.5))  # w_dom = N - 0.5, others 1, normalised
        expected = sum(wi * diffusion_out(r, call) for wi, r in zip(w, refs))
        assert torch.allclose(call["out"], expected, atol=1e-4), (call["out"] - expected).abs().max()


def test_pass_counts_and_flop_ratio_match_the_schedule(sd15_narrow, conds):
    model = sd15_narrow[0]
    st = cat_stack(A, B, C)
    sched = schedule(st, dominant_full=True)[0]
    patched = cmlora(model, st, sched)
    steps = 6
    ksample(patched, conds, steps=steps)
    runtime = runtime_of(patched)
    trace = runtime.last_trace
    planner = Planner(sched, steps)
    plans = [planner.plan(i) for i in range(steps)]
    calls_per_step = trace.model_calls // steps  # cond and uncond batched: one call per step here
    assert trace.model_calls == steps * calls_per_step
    assert trace.full_passes == calls_per_step * sum(p.passes.count(FULL) for p in plans)
    assert trace.shallow_passes == calls_per_step * sum(p.passes.count(SHALLOW) for p in plans)
    assert [trace.plans[i].dominant for i in range(steps)] == [p.dominant for p in plans]
    f = trace.shallow_fraction
    assert 0.0 < f < 1.0
    assert runtime.flop_ratio(trace) == pytest.approx((trace.full_passes + f * trace.shallow_passes) / trace.model_calls)
    report = runtime.report(trace)
    assert f"{trace.full_passes} full, {trace.shallow_passes} shallow" in report and "x the model FLOPs of merge" in report
    assert f"{runtime.flop_ratio(trace):.3f}x" in report
    # with dominant_full: N full passes at step 0, then one full pass per step
    assert trace.full_passes == calls_per_step * (3 + (steps - 1))


def test_first_run_runs_only_its_scheduled_passes_and_reports_their_flops(sd15_narrow, conds):
    """No pass of the real model beyond the schedule's, even on the first run of a process, counted by
    hooks on the model; the report's FLOP ratio is those passes' FLOPs as torch counts them running."""
    from comfyui_cmlora.nodes import unet_split

    unet_split.FLOP_FRACTIONS.clear()  # nothing counted yet, as in a fresh process
    model = sd15_narrow[0]
    unet = model.model.diffusion_model
    rows = {"outer": 0, "deep": 0}  # rows through the first input block (every pass), the deepest (full only)

    def counter(part):
        def hook(module, args, output):
            rows[part] += args[0].shape[0]
        return hook

    hooks = [unet.input_blocks[0][0].register_forward_hook(counter("outer")),
             unet.input_blocks[-1][0].register_forward_hook(counter("deep"))]
    st = cat_stack(A, B, C)
    sched = schedule(st, dominant_full=True)[0]
    patched = cmlora(model, st, sched)
    steps = 6
    try:
        ksample(patched, conds, steps=steps)
    finally:
        for h in hooks:
            h.remove()
    runtime = runtime_of(patched)
    trace = runtime.last_trace
    per_call = 2  # cond and uncond in one call
    calls_per_step = trace.model_calls // steps
    # by hand: step 0 runs the three LoRAs' full passes, steps 1-5 the dominant's full pass and two shallow
    full, shallow = calls_per_step * (3 + 5), calls_per_step * (5 * 2)
    assert rows == {"outer": (full + shallow) * per_call, "deep": full * per_call}
    assert (trace.full_passes, trace.shallow_passes) == (full, shallow)

    full_flops, shallow_flops = real_pass_flops(model)
    assert trace.shallow_fraction == pytest.approx(shallow_flops / full_flops, rel=1e-9)
    ratio = (full * full_flops + shallow * shallow_flops) / (trace.model_calls * full_flops)
    assert runtime.flop_ratio(trace) == pytest.approx(ratio, rel=1e-9)
    assert f"this run took {ratio:.3f}x the model FLOPs of merge" in runtime.report(trace)


def test_cmlora_run_leaves_base_model_bit_identical(sd15_narrow, conds):
    model = sd15_narrow[0]
    before = ksample(model, conds, steps=3)
    st = cat_stack(A, B, C)
    ksample(cmlora(model, st, schedule(st)[0]), conds, steps=3)
    assert torch.equal(before, ksample(model, conds, steps=3))


# ------------------------------------------------------------------ profiler

def _spectral_lora(path, kernel, gain):
    """A rank-1 LoRA on the UNet's output conv: eps += gain * (kernel * a zero-mean channel mix of its input).

    The channel mix has zero mean (+1 and -1 halves) so the kernel sees a zero-mean map:
    a plain channel mean would be a constant whose zero-padded border dominates any kernel.
    """
    import make_fixtures as fx

    unet_sd, unet_map, _, _ = fx.sd15_key_maps(narrow=True)
    name = next(k for k, v in unet_map.items() if v == "diffusion_model.out.2.weight" and k.startswith("lora_unet_"))
    width = unet_sd["diffusion_model.out.2.weight"].shape[1]
    mix = torch.ones(width)
    mix[1::2] = -1.0
    down = (kernel[None, None] * mix[None, :, None, None] / width).contiguous()
    up = torch.full((4, 1, 1, 1), gain)
    save_file({f"{name}.lora_down.weight": down.half(), f"{name}.lora_up.weight": up.half(),
               f"{name}.alpha": torch.tensor(1.0).half()}, str(path))


def test_profiler_separates_edge_and_smoothing_loras(sd15_narrow, models_dir):
    model, clip, vae = sd15_narrow
    # known before running: a Laplacian (high-pass) LoRA is high-frequency, a box blur is low-frequency.
    # Decoded images are profiled (as the paper does): the random model's latents are white noise, which
    # no spectrum can top, while the decoder gives the baseline a natural, decaying spectrum.
    edges = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]])
    blur = torch.ones(3, 3) / 9.0
    _spectral_lora(models_dir / "loras" / "spectral_edges.safetensors", edges, 2000.0)
    _spectral_lora(models_dir / "loras" / "spectral_flat.safetensors", blur, 2000.0)
    st = stack(("spectral_flat.safetensors", 1.0), (A, 1.0), ("spectral_edges.safetensors", 1.0))
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a cat"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    args = dict(model=model, stack=st, positive=pos, negative=neg, latent_image=latent, seed=3, steps=3, cfg=4.0,
                sampler_name="euler", scheduler="normal", vae=vae)
    profile, plot = ProfilerNode.execute(**args).args
    assert "spectral_edges.safetensors" in profile["high"] and "spectral_flat.safetensors" in profile["low"]
    assert profile["order"][0] == "spectral_edges.safetensors"
    scores = {e["name"]: e["score"] for e in profile["loras"]}
    assert scores["spectral_edges.safetensors"] > profile["baseline"]["score"] > scores["spectral_flat.safetensors"]
    assert all(len(e["curve"]) == 3 and len(e["profile"]) == 91 for e in profile["loras"])  # 128x128: rings to the corner, 0..90
    assert plot.shape[0] == 1 and plot.shape[-1] == 3
    # the same inputs again cost nothing (same object back), and the profile is plain JSON
    assert ProfilerNode.execute(**args).args[0] is profile
    SaveProfile.execute(profile=profile, filename="test_profile")
    loaded = LoadProfile.execute(profile_file="test_profile.json").args[0]
    assert loaded["high"] == profile["high"] and loaded["base_model"] == profile["base_model"]
    # categories override the measurement
    st2 = stack({"lora_name": "spectral_flat.safetensors", "category": "character"}, (A, 1.0),
                {"lora_name": "spectral_edges.safetensors", "category": "background"})
    overridden = ProfilerNode.execute(**{**args, "stack": st2}).args[0]
    assert "spectral_flat.safetensors" in overridden["high"] and "spectral_edges.safetensors" in overridden["low"]
    # and the profile drives a schedule that samples
    sched, timeline = schedule(profile=loaded)
    assert sched.source == "profile" and timeline.shape[-1] == 3
    out = ksample(cmlora(model, st, sched), (pos, neg), steps=4)
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------ bad input

def _error(fn, *a, **kw) -> str:
    with pytest.raises(CMLoRAError) as e:
        fn(*a, **kw)
    return str(e.value)


def test_bad_schedules(sd15_narrow, conds):
    model = sd15_narrow[0]
    st = cat_stack(A, B, C)
    sched = schedule(st)[0]
    msg = _error(cmlora, model, cat_stack(A, B), sched)
    assert "schedule was made for the LoRAs" in msg
    assert "at least 2 LoRAs" in _error(schedule, cat_stack(A))
    msg = _error(ksample, cmlora(model, st, sched), conds, steps=2)
    assert "3 LoRAs need at least 3 steps" in msg
    assert "needs a schedule" in _error(apply, model, st, "cmlora")
    measured = {"score": 0.5, "profile": [1.0, 0.5], "curve": [0.5]}
    fake = {"version": 2, "base_model": "SD15:0000000000000000", "baseline": {"name": "baseline", **measured},
            "loras": [{"name": n, "set": s, **measured} for n, s in ((A, "H"), (B, "L"), (C, "H"))],
            "high": [A, C], "low": [B]}
    msg = _error(cmlora, model, st, schedule(profile=fake)[0])
    assert "another base model" in msg
    assert "not a CMLoRA profile" in _error(schedule, profile={"x": 1})


def test_error_during_a_sampler_nodes_run_names_the_sampler_node(sd15_narrow, conds):
    """The runtime raises while the host samples; the message names the node that started the run."""
    st = cat_stack(A, B, C)
    pos, neg = conds
    with pytest.raises(CMLoRAError, match=r"^\[CMLoRA Sampler\] input 'schedule': 3 LoRAs need at least 3 steps"):
        SamplerNode.execute(model=sd15_narrow[0], stack=st, method="cmlora", switch_interval=1, schedule=schedule(st)[0],
                            seed=0, steps=2, cfg=5.0, sampler_name="euler", scheduler="normal", positive=pos,
                            negative=neg, latent_image={"samples": torch.zeros(1, 4, 8, 8)}, denoise=1.0)


def test_online_switch_point_follows_threshold_in_a_real_run(sd15_narrow, conds):
    model = sd15_narrow[0]
    st = cat_stack(A, B, C)
    switched = {}
    for threshold in (0.0, 1.0):
        patched = cmlora(model, st, schedule(st, mode="online", online_threshold=threshold)[0])
        ksample(patched, conds, steps=4)
        trace = runtime_of(patched).last_trace
        switched[threshold] = trace.switched_at
        phases = [trace.plans[i].phase for i in range(4)]
        if trace.switched_at is not None:
            assert phases[trace.switched_at:] == ["L"] * (4 - trace.switched_at)
    assert switched[0.0] is None  # 0 never switches
    assert switched[1.0] == 1  # every score is below 1: the phase changes right after the first step


def test_prediction_cache_reuses_whole_predictions(sd15_narrow, conds):
    model = sd15_narrow[0]
    st = cat_stack(A, B, C)
    sched = schedule(st, cache="prediction", dominant_full=True)[0]
    patched = cmlora(model, st, sched)
    out = ksample(patched, conds, steps=4)
    trace = runtime_of(patched).last_trace
    plans = [Planner(sched, 4).plan(i) for i in range(4)]
    assert trace.shallow_passes == 0
    assert trace.reused == sum(p.passes.count("reuse") for p in plans) > 0
    assert trace.full_passes == sum(p.passes.count(FULL) for p in plans)
    assert torch.isfinite(out).all()


def test_the_profiler_samples_each_lora_over_its_step_range(sd15_narrow, conds):
    """A LoRA limited to the first half is profiled on the image the host's own nodes make of it: LoraLoader
    for the first two steps, the base model for the last two; a profile without the range is another."""
    from comfyui_cmlora.nodes.profiling import _measure

    model = sd15_narrow[0]
    pos, neg = conds
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    args = dict(model=model, positive=pos, negative=neg, latent_image=latent, seed=3, steps=4, cfg=4.0,
                sampler_name="euler", scheduler="normal")
    ranged = ProfilerNode.execute(stack=stack({"lora_name": A, "end_at": 0.5}, (B, 1.0)), **args).args[0]
    on = lora_loader(model, (A, 1.0))
    expected = stepwise_reference([on, on, model, model], conds, "euler", 4, seed=3, cfg=4.0,
                                  latent_shape=(1, 4, 16, 16))
    assert ranged["loras"][0]["score"] == pytest.approx(_measure(expected, decoded=False)[1], rel=1e-4)
    whole = ProfilerNode.execute(stack=stack((A, 1.0), (B, 1.0)), **args).args[0]
    assert whole["cache_key"] != ranged["cache_key"] and whole["loras"][0]["score"] != ranged["loras"][0]["score"]
