"""Host-free tests of cmlora_core: schedules, routed deltas, file parsing, stack rules."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmlora_core.errors import CMLoRAError
from cmlora_core.lora_file import FileCache, classify, guess_base, trigger_from_metadata
from cmlora_core.routing import DenseDelta, LowRankDelta, RoutedLayer, Routing, combine_copies, repeat_rows
from cmlora_core.steps import (NoiseSteps, SwitchTurns, composite_weights, curve_strength, step_index, switch_active,
                               switch_turns, whole_run_totals)
from cmlora_core.stack import LoraEntry, LoraStack, require_model_entries


def test_switch_rule_gives_every_lora_exactly_interval_steps():
    active = [switch_active(i, 5, 3) for i in range(30)]
    assert active[:16] == [0] * 5 + [1] * 5 + [2] * 5 + [0]
    assert all(active.count(k) == 10 for k in range(3))
    with pytest.raises(ValueError):
        switch_active(0, 0, 2)


def test_step_index_from_sigma_schedule():
    sigmas = torch.tensor([14.6, 7.0, 3.0, 1.0, 0.0])
    assert [step_index(sigmas, s) for s in sigmas[:-1]] == [0, 1, 2, 3]
    # intermediate evaluations (Heun, DPM++ 2S) belong to the step they start from
    assert step_index(sigmas, 5.0) == 1 and step_index(sigmas, 0.5) == 3
    # a float32 round trip of the same value still hits its step
    assert step_index(sigmas, torch.tensor([7.0], dtype=torch.float16).float() * (1 - 1e-7)) == 1
    assert step_index(sigmas, 100.0) == 0


def test_composite_weights_are_a_mean():
    assert composite_weights(4) == [0.25] * 4


def _conv(x, w, **kw):
    return F.conv2d(x, w, None, kw.get("stride", 1), kw.get("padding", 0))


def test_low_rank_delta_equals_merged_weight_linear_and_conv():
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(3, 16, generator=g), torch.randn(8, 3, generator=g)
    x = torch.randn(2, 5, 16, generator=g)
    d = LowRankDelta(down, up, 0.5, "linear")
    assert torch.allclose(d(x), F.linear(x, 0.5 * up @ down), atol=1e-5)
    cdown, cup = torch.randn(3, 4, 3, 3, generator=g), torch.randn(6, 3, 1, 1, generator=g)
    xc = torch.randn(2, 4, 9, 7, generator=g)
    conv = {"stride": (2, 2), "padding": (1, 1), "dilation": (1, 1)}
    dc = LowRankDelta(cdown, cup, 2.0, "conv", conv)
    merged = 2.0 * (cup.flatten(1) @ cdown.flatten(1)).reshape(6, 4, 3, 3)
    assert torch.allclose(dc(xc), _conv(xc, merged, stride=2, padding=1), atol=1e-4)
    dd = DenseDelta(merged, None, "conv", conv)
    assert torch.allclose(dd(xc), dc(xc), atol=1e-4)


class _State:
    routing = None
    products = None  # no FLOP tally


def test_routed_layer_adds_each_loras_delta_to_its_rows_only():
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(6, 4)
    deltas = {0: DenseDelta(torch.randn(4, 6, generator=g), None, "linear"),
              1: LowRankDelta(torch.randn(2, 6, generator=g), torch.randn(4, 2, generator=g), 1.0, "linear")}
    state = _State()
    layer = RoutedLayer("lin", deltas, state)
    handle = lin.register_forward_hook(layer)
    x = torch.randn(4, 3, 6, generator=g)
    base = lin(x)
    state.routing = Routing.blocks(2, [(0, 0.5), (1, 2.0)])
    with torch.no_grad():
        y = lin(x)
    assert torch.allclose(y[:2], base[:2] + 0.5 * deltas[0](x[:2]), atol=1e-5)
    assert torch.allclose(y[2:], base[2:] + 2.0 * deltas[1](x[2:]), atol=1e-5)
    state.routing = Routing(rows=3, routes=())
    with pytest.raises(RuntimeError, match="rows"):
        lin(x)
    state.routing = None  # outside a run the hook changes nothing, bit for bit
    assert torch.equal(lin(x), base)
    handle.remove()


def test_routed_layer_keeps_gradients():
    lin = torch.nn.Linear(3, 3)
    state = _State()
    lin.register_forward_hook(RoutedLayer("lin", {0: DenseDelta(torch.eye(3), None, "linear")}, state))
    state.routing = Routing.blocks(1, [(0, 1.0)])
    x = torch.randn(1, 3, requires_grad=True)
    lin(x).sum().backward()
    assert torch.allclose(x.grad, (lin.weight + torch.eye(3)).sum(0), atol=1e-6)


def test_deltas_on_slices_of_a_fused_layer_equal_the_merged_slices():
    """A fused q/k/v layer (12 outputs = 3 x 4): one LoRA patches the k and v slices separately
    (diffusers names on Flux's qkv), another the whole layer; each equals its merged weight."""
    g = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(6, 12)
    dk, uk = torch.randn(2, 6, generator=g), torch.randn(4, 2, generator=g)
    dv = torch.randn(4, 6, generator=g)
    whole = LowRankDelta(torch.randn(2, 6, generator=g), torch.randn(12, 2, generator=g), 0.5, "linear")
    deltas = {0: [LowRankDelta(dk, uk, 0.5, "linear", out=(4, 4)), DenseDelta(dv, None, "linear", out=(8, 4)),
                  DenseDelta(None, torch.ones(4), "linear", out=(8, 4))],
              1: whole}
    state = _State()
    lin.register_forward_hook(RoutedLayer("qkv", deltas, state))
    x = torch.randn(2, 5, 6, generator=g)
    merged0 = lin.weight.detach().clone()
    merged0[4:8] += 0.5 * uk @ dk
    merged0[8:12] += dv
    bias0 = lin.bias.detach().clone()
    bias0[8:12] += 1.0
    merged1 = lin.weight.detach() + 0.5 * whole.up @ whole.down
    state.routing = Routing.blocks(1, [(0, 1.0), (1, 1.0)])
    with torch.no_grad():
        y = lin(x)
    assert torch.allclose(y[:1], torch.nn.functional.linear(x[:1], merged0, bias0), atol=1e-5)
    assert torch.allclose(y[1:], torch.nn.functional.linear(x[1:], merged1, lin.bias), atol=1e-5)
    # with gradients (CLoRA's latent updates), the same values and the slices' weights in the gradient
    xg = x[:1].clone().requires_grad_(True)
    state.routing = Routing.blocks(1, [(0, 1.0)])
    out = lin(xg)
    assert torch.allclose(out, y[:1], atol=1e-5)
    out.sum().backward()
    assert torch.allclose(xg.grad, merged0.sum(0).expand_as(xg), atol=1e-5)
    state.routing = None


def test_repeat_rows_and_combine_copies():
    x = torch.arange(6.0).reshape(2, 3)
    value = {"a": [x, None, torch.ones(5)], "b": (x, 3)}
    rep = repeat_rows(value, 2, 3)
    assert rep["a"][0].shape == (6, 3) and rep["a"][2].shape == (5,) and rep["b"][1] == 3
    out = torch.cat([x, 2 * x, 4 * x])
    assert torch.allclose(combine_copies(out, [0.5, 0.25, 0.25]), x * (0.5 + 0.5 + 1.0))


def test_classify_formats_and_rank():
    lora = {"lora_unet_a.lora_down.weight": torch.zeros(4, 8), "lora_unet_a.lora_up.weight": torch.zeros(8, 4),
            "lora_unet_a.alpha": torch.tensor(4.0)}
    assert classify(lora) == ("kohya", 4, False, False)
    lora["lora_unet_c.lora_down.weight"] = torch.zeros(4, 8, 3, 3)
    assert classify(lora)[0] == "locon"
    assert classify({"unet.x.lora_A.weight": torch.zeros(2, 3)})[:2] == ("peft", 2)
    assert classify({"lora_unet_x.hada_w1_a": torch.zeros(3, 2)})[0] == "loha"
    assert classify({"model.diffusion_model.x.weight": torch.zeros(2)})[0] == "unknown"


def test_trigger_words_from_metadata():
    meta = {"ss_tag_frequency": json.dumps({"10_sks": {"sks": 30, "cat": 12}, "5_x": {"cat": 10}})}
    assert trigger_from_metadata(meta) == "sks"
    assert trigger_from_metadata({"modelspec.trigger_phrase": "ohwx man", **meta}) == "ohwx man"
    assert trigger_from_metadata({"ss_tag_frequency": "not json"}) == ""


def test_guess_base_from_cross_attention_width():
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    assert guess_base({key: torch.zeros(4, 2048)}) == "SDXL"
    assert guess_base({key: torch.zeros(4, 768)}) == "SD1.x"


@pytest.mark.parametrize("key, base", [
    ("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "Flux"),
    ("transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight", "Flux"),
    ("transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight", "Flux.2"),
    ("transformer.transformer_blocks.0.img_mlp.net.0.proj.lora_A.weight", "Qwen-Image"),
    ("lora_unet_transformer_blocks_0_txt_mlp_net_2.lora_down.weight", "Qwen-Image"),
    ("diffusion_model.noise_refiner.0.attention.to_q.lora_A.weight", "Z-Image (or Lumina 2)"),
    ("lora_unet_layers_0_feed_forward_w1.lora_down.weight", "Z-Image (or Lumina 2)"),
    ("transformer.transformer_blocks.0.attn.to_q.lora_A.weight", ""),  # Flux or Qwen attention alone
])
def test_guess_base_of_dit_loras_from_their_block_names(key, base):
    assert guess_base({key: torch.zeros(4, 64)}) == base


def test_file_cache_reloads_when_the_file_changes(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"1")
    loads = []
    cache = FileCache(2)
    load = lambda path: loads.append(path) or open(path, "rb").read()  # noqa: E731
    assert cache.get(str(p), load) == b"1" and cache.get(str(p), load) == b"1"
    assert len(loads) == 1
    p.write_bytes(b"22")
    assert cache.get(str(p), load) == b"22" and len(loads) == 2


def test_file_cache_is_bounded_by_size_not_count(tmp_path):
    files = []
    for i, n in enumerate((40, 50, 30, 200)):
        p = tmp_path / f"f{i}.bin"
        p.write_bytes(b"x" * n)
        files.append(str(p))
    cache = FileCache(budget=100, size=len)
    read = lambda path: open(path, "rb").read()  # noqa: E731
    cache.get(files[0], read)
    cache.get(files[1], read)
    assert len(cache) == 2 and cache.used == 90
    cache.get(files[2], read)  # 120 > 100: the oldest (40) goes
    assert len(cache) == 2 and cache.used == 80
    cache.get(files[3], read)  # larger than the budget alone: kept, everything else goes
    assert len(cache) == 1 and cache.used == 200


def test_stack_rules(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"x")
    b.write_bytes(b"y")
    st = LoraStack().append(LoraEntry("a", str(a))).append(LoraEntry("b", str(b), strength_model=0.0))
    with pytest.raises(CMLoRAError, match="already in this stack"):
        st.append(LoraEntry("a again", str(a)))
    assert [e.name for e in require_model_entries(st, "N")] == ["a"]
    with pytest.raises(CMLoRAError, match=r"\[N\] input 'stack': the LoRA stack is empty"):
        require_model_entries(LoraStack(), "N")


# ------------------------------------------------------------------ CLoRA

from cmlora_core.clora import (branch_masks, combine_user_masks, concept_masks, euler_correction, fit_user_masks,  # noqa: E402
                               fuse, normalise_maps, nt_xent,
                               token_positions, update_plan, x_space_step)


def test_nt_xent_matches_a_hand_computed_example():
    maps = torch.tensor([[0.0, 1.0, 2.0], [0.0, 2.0, 4.0], [4.0, 2.0, 0.0]])
    # normalised: a = [0, .5, 1], b = [0, .5, 1], c = [1, .5, 0]; cos(a,b) = 1, cos(a,c) = cos(b,c) = .25/1.25 = 0.2
    t = 0.5
    s_ab, s_ac = 1.0 / t, 0.2 / t
    # anchors a and b each have one positive (each other) and one negative (c); c has no positive
    expected = -math.log(math.exp(s_ab) / (math.exp(s_ab) + math.exp(s_ac)))
    assert float(nt_xent(maps, [0, 0, 1], t)) == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(normalise_maps(maps)[2], torch.tensor([1.0, 0.5, 0.0]))


def test_one_gradient_step_lowers_the_loss():
    torch.manual_seed(0)
    maps = torch.rand(4, 16, requires_grad=True)
    concept = [0, 0, 1, 1]
    loss = nt_xent(maps, concept)
    (grad,) = torch.autograd.grad(loss, maps)
    assert float(nt_xent(maps.detach() - 0.05 * grad, concept)) < float(loss.detach())


def test_update_plan_and_x_space_step():
    plan = update_plan(50, stop_fraction=0.5, extra_iterations=20)
    assert sorted(plan) == list(range(25))
    assert plan[0] == 21 and plan[5] == 21 and plan[10] == 21 and plan[1] == 1
    assert update_plan(10, stop_fraction=0.0) == {}
    assert x_space_step(20.0, 2.0) == 100.0


def test_euler_correction_makes_euler_continue_from_the_new_latent():
    torch.manual_seed(0)
    x, x_new, eps = torch.randn(3), torch.randn(3), torch.randn(3)
    sigma, sigma_next = 3.0, 2.0
    # the sampler steps from its own x with the corrected prediction ...
    corrected = eps + euler_correction(x, x_new, sigma, sigma_next)
    from_x = x + corrected * (sigma_next - sigma)
    # ... and lands where a step from the updated latent lands
    assert torch.allclose(from_x, x_new + eps * (sigma_next - sigma), atol=1e-6)


def test_euler_correction_for_v_prediction():
    """A v-prediction model: the host's denoised image is x / (1 + s^2) - v * s / sqrt(1 + s^2) with the
    sampler's own x; corrected, its Euler step from x lands where the step from the updated latent does."""
    torch.manual_seed(1)
    x, x_new, v = torch.randn(3), torch.randn(3), torch.randn(3)
    sigma, sigma_next = 3.0, 2.0

    def denoised(latent, out):
        return latent / (1 + sigma ** 2) - out * sigma / math.sqrt(1 + sigma ** 2)

    def euler(latent, d):
        return latent + (latent - d) / sigma * (sigma_next - sigma)

    keep, gain = 1 / (1 + sigma ** 2), -sigma / math.sqrt(1 + sigma ** 2)
    corrected = v + euler_correction(x, x_new, sigma, sigma_next, keep, gain)
    assert torch.allclose(euler(x, denoised(x, corrected)), euler(x_new, denoised(x_new, v)), atol=1e-6)
    plain = v + euler_correction(x, x_new, sigma, sigma_next)  # epsilon's correction misses here
    assert not torch.allclose(euler(x, denoised(x, plain)), euler(x_new, denoised(x_new, v)), atol=1e-2)


def test_token_positions_and_masks():
    assert token_positions([1, 5, 6, 7, 5, 6], [5, 6]) == [1, 2]
    assert token_positions([1, 2], [3]) == []
    a = torch.zeros(1, 2, 3)
    a[0, 0, 2] = 1.0  # top-right corner of a 2x3 (non-square) map
    a[0, 1, 0] = 0.3
    m = concept_masks([a], 0.4)
    assert m[0].tolist() == [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    masks = branch_masks(m[None], (4, 6))
    assert masks.shape == (2, 1, 1, 4, 6)
    assert masks[1, 0, 0, :2, 4:].eq(1).all() and masks[0, 0, 0, :2, 4:].eq(0).all()
    assert masks[0].sum() + masks[1].sum() == 24  # every pixel in exactly one mask here


def test_fusion_formula_and_base_outside_masks():
    torch.manual_seed(0)
    outputs = torch.randn(3, 2, 4, 4, 4)
    masks = torch.zeros(3, 2, 1, 4, 4)
    masks[1, :, :, :2] = 1.0
    masks[2, :, :, 1:3] = 1.0
    masks[0] = (masks[1:].sum(0) == 0).float()
    fused = fuse(outputs, masks)
    assert torch.allclose(fused, (outputs * masks).sum(0) / masks.sum(0))
    assert torch.equal(fused[:, :, 3], outputs[0][:, :, 3])  # in no subject's mask: the base prompt
    assert torch.allclose(fused[:, :, 1], (outputs[1] + outputs[2])[:, :, 1] / 2)  # overlap: the mean


def test_user_masks_fit_the_latent_and_combine_with_the_found_ones():
    drawn = torch.zeros(2, 16, 32)  # 2 subjects, a 2:1 image
    drawn[0, :, :16] = 1.0  # left half
    drawn[1, :, 16:] = 0.6  # right half, soft: in (at least half white)
    drawn[1, :, 12:16] = 0.4  # a soft band: out
    fit = fit_user_masks(drawn, subjects=2, batch=3, size=(2, 4))
    assert fit.shape == (2, 3, 2, 4)
    assert fit[0, 2].tolist() == [[1, 1, 0, 0]] * 2 and fit[1, 0].tolist() == [[0, 0, 1, 1]] * 2
    # one mask per subject and image, subject major
    per_image = torch.cat([drawn[:1], drawn[:1].flip(-1), drawn[1:], drawn[1:].flip(-1)])
    fit = fit_user_masks(per_image, subjects=2, batch=2, size=(2, 4))
    assert fit[0, 1].tolist() == [[0, 0, 1, 1]] * 2 and fit[1, 1].tolist() == [[1, 1, 0, 0]] * 2
    with pytest.raises(ValueError, match="3 masks for 2 subjects"):
        fit_user_masks(drawn[:1].expand(3, -1, -1), subjects=2, batch=1, size=(2, 4))
    found = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    mine = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    assert torch.equal(combine_user_masks(found, mine, "replace"), mine)
    assert combine_user_masks(found, mine, "add").tolist() == [[[[1, 1], [0, 0]]]]
    assert combine_user_masks(torch.ones_like(found), mine, "limit").tolist() == [[[[1, 1], [0, 0]]]]
    with pytest.raises(ValueError, match="mask mode"):
        combine_user_masks(found, mine, "both")


# ------------------------------------------------------------------ per-LoRA ranges and curves, on the noise level
def _sd_schedule():
    """An SD1.5 schedule built here with numpy as the papers define it: scaled-linear betas, sigma(t) =
    sqrt((1 - abar_t) / abar_t) for t = 0..999, interpolated in log sigma; percent p -> t = (1 - p) * 999."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1 - betas)
    log_sigmas = np.log(np.sqrt((1 - abar) / abar))

    def sigma(t):
        return float(np.exp(np.interp(t, np.arange(1000), log_sigmas)))

    def percent_to_sigma(p):
        return 1e9 if p <= 0 else 0.0 if p >= 1 else sigma((1 - p) * 999)

    return sigma, percent_to_sigma


def _normal(total):
    """ComfyUI's 'normal' scheduler by hand: timesteps evenly from 999 to 0, then 0 (step i at p = i/(total-1))."""
    sigma, _ = _sd_schedule()
    return [sigma(t) for t in np.linspace(999, 0, total)] + [0.0]


@pytest.mark.parametrize("start,end,total", [
    (0.0, 1.0, 5), (0.0, 0.5, 20), (0.5, 1.0, 20), (0.0, 0.5, 21), (0.5, 1.0, 21), (0.25, 0.75, 9), (0.9, 0.95, 4),
])
def test_a_range_holds_the_steps_whose_noise_level_lies_in_it(start, end, total):
    _, percent_to_sigma = _sd_schedule()
    steps = NoiseSteps.of(_normal(total), percent_to_sigma)
    # on the normal scheduler step i starts at place i / (total - 1); a step at a boundary belongs to the
    # range that starts there, and a range ending at 1 reaches the last step
    expected = [i for i in range(total) if start - 1e-9 <= i / (total - 1) and (i / (total - 1) < end - 1e-9 or end == 1)]
    assert steps.steps_on(start, end) == expected
    assert [steps.position(i) for i in expected] == pytest.approx([i / (total - 1) for i in expected], abs=1e-6)
    if (start, end, total) == (0.0, 0.5, 20):
        assert expected == list(range(10))  # half of an even normal schedule: exactly half the steps


def test_on_karras_a_range_of_half_the_noise_holds_fewer_steps():
    """Karras's schedule (rho 7, by hand) spends its steps at low noise: on SD1.5, of 20 steps the first
    half of the noise level holds 9 — the steps whose noise level is at or above the level at place 0.5."""
    sigma, percent_to_sigma = _sd_schedule()
    top, bottom = sigma(999) ** (1 / 7), sigma(0) ** (1 / 7)
    karras = [(top + i / 19 * (bottom - top)) ** 7 for i in range(20)] + [0.0]
    half = sigma(999 * 0.5)
    expected = [i for i in range(20) if karras[i] >= half * (1 - 1e-9)]
    assert len(expected) == 9 and NoiseSteps.of(karras, percent_to_sigma).steps_on(0.0, 0.5) == expected


def test_a_run_split_in_two_passes_places_its_steps_as_one_run():
    _, percent_to_sigma = _sd_schedule()
    whole = _normal(20)
    one = NoiseSteps.of(whole, percent_to_sigma)
    for cut in (3, 10, 17):
        first, second = NoiseSteps.of(whole[:cut + 1], percent_to_sigma), NoiseSteps.of(whole[cut:], percent_to_sigma)
        for start, end in ((0.0, 0.5), (0.5, 1.0), (0.2, 0.7), (0.0, 1.0)):
            assert first.steps_on(start, end) + [cut + i for i in second.steps_on(start, end)] == one.steps_on(start, end)
        if cut == 10:  # the second pass is what KSampler runs at denoise 0.5: the first half holds none of it
            assert second.steps_on(0.0, 0.5) == []
        ramp = LoraEntry("a", "/a", strength_model=1.0, start=0.1, end=0.9, curve="smooth", strength_end=0.0)
        split = [ramp.strength_at(i, first) for i in range(cut)] + [ramp.strength_at(i, second) for i in range(20 - cut)]
        assert split == pytest.approx([ramp.strength_at(i, one) for i in range(20)], abs=1e-9)


def _geometric(t):  # a schedule falling evenly on log sigma, ending at 0 (as karras or exponential do)
    return [14.6 * (0.03 / 14.6) ** (i / max(1, t - 1)) for i in range(t)] + [0.0]


_TABLE = [14.6 * (0.03 / 14.6) ** (j / 999) for j in range(1000)][::-1]  # a model's 1000 noise levels, rising


def _picked(t):  # picks from the table with a stride of 1000 / t (as 'simple' does): many t share points
    return [_TABLE[-(1 + int(i * 1000 / t))] for i in range(t)] + [0.0]


def _linear(t):  # evenly spaced, the last point before 0 left out (as 'sgm_uniform')
    return [14.6 - (14.6 - 0.03) * i / t for i in range(t)] + [0.0]


@pytest.mark.parametrize("total, cut", [(8, 3), (20, 10), (20, 17), (57, 1), (150, 2), (150, 149), (200, 60)])
def test_the_whole_run_of_a_split_pass_is_every_schedule_it_begins(total, cut):
    """The step counts found for a pass that stops with noise left are exactly those a scan of every count
    finds (any scheduler, any count up to the limit, whose first points are the pass's)."""
    schedules = {"geometric": _geometric, "picked": _picked, "linear": _linear}
    for name, schedule in schedules.items():
        points = schedule(total)[:cut + 1]
        scan = sorted({t for t in range(cut + 1, 301) for other in schedules.values()
                       if len(other(t)) > cut + 1 and all(abs(a - b) <= 1e-5 * max(1.0, b)
                                                          for a, b in zip(other(t), points))})
        found = whole_run_totals(points, lambda n, t: schedules[n](t), list(schedules), max_steps=300)
        assert found == scan and total in found, (name, found, scan)
    assert whole_run_totals(_geometric(20)[:6] + [0.5], lambda n, t: _geometric(t), ["g"]) == []  # begins no run
    assert whole_run_totals(_geometric(20), lambda n, t: _geometric(t), ["g"]) == []  # no noise left


def test_even_steps_are_the_previews_schedule():
    steps = NoiseSteps.even(10)
    assert steps.steps_on(0.0, 0.5) == [0, 1, 2, 3, 4] and steps.steps_on(0.5, 1.0) == [5, 6, 7, 8, 9]
    assert steps.steps_on(0.91, 0.99) == [] and steps.steps_on(0.9, 0.95) == [9]  # no step starts in the first
    for total in range(1, 30):
        for cut in (0.1, 1 / 3, 0.5, 0.77):
            even = NoiseSteps.even(total)
            assert even.steps_on(0, cut) + even.steps_on(cut, 1) == list(range(total))


def test_curve_strength_formulas():
    # a ramp from strength at the range's start to strength_end at its end, by place on the noise level
    assert curve_strength(1.0, 0.0, "constant", 0.7, 0.2, 0.8) == 1.0
    assert [curve_strength(1.0, 0.2, "linear", p, 0.2, 0.7) for p in (0.2, 0.325, 0.45, 0.7)] == pytest.approx(
        [1.0, 0.8, 0.6, 0.2])
    smooth = [curve_strength(1.0, 0.2, "smooth", 0.2 + 0.5 * k / 4, 0.2, 0.7) for k in range(5)]
    assert smooth == pytest.approx([1.0 - 0.8 * (0.5 - 0.5 * math.cos(math.pi * k / 4)) for k in range(5)])
    assert smooth[2] == pytest.approx(0.6) and smooth[1] > 0.8  # eases: slower at the ends
    with pytest.raises(ValueError):
        curve_strength(1.0, 0.0, "zigzag", 0.3, 0.0, 1.0)


def test_entry_strength_at_and_its_checks():
    plain = LoraEntry("a", "/a", strength_model=0.8)
    four = NoiseSteps.even(4)  # steps at places 0, 0.25, 0.5, 0.75
    assert not plain.scheduled and [plain.strength_at(i, four) for i in range(4)] == [0.8] * 4
    ranged = LoraEntry("a", "/a", strength_model=0.8, end=0.5, curve="linear", strength_end=0.4)
    assert ranged.scheduled and [ranged.strength_at(i, four) for i in range(4)] == pytest.approx([0.8, 0.6, 0, 0])
    assert ranged.describe_schedule() == "noise 0%-50%, strength 0.8 -> 0.4 (linear)"
    for bad in (dict(start=0.5, end=0.5), dict(start=-0.1), dict(end=1.5), dict(curve="zigzag")):
        with pytest.raises(ValueError):
            LoraEntry("a", "/a", **bad)


def test_a_fade_in_from_strength_zero_is_active():
    fade_in = LoraEntry("a", "/a", strength_model=0.0, curve="linear", strength_end=1.0)
    _, percent_to_sigma = _sd_schedule()
    five = NoiseSteps.of(_normal(5), percent_to_sigma)  # places 0, .25, .5, .75, 1
    assert fade_in.active_model and [fade_in.strength_at(i, five) for i in range(5)] == pytest.approx(
        [0, .25, .5, .75, 1], abs=1e-6)
    assert LoraStack((fade_in,)).model_entries() == (fade_in,)
    # off on every step: a constant 0, a curve from 0 to 0, or disabled
    for off in (LoraEntry("a", "/a", strength_model=0.0), LoraEntry("a", "/a", strength_model=0.0, curve="smooth"),
                LoraEntry("a", "/a", strength_model=0.0, curve="linear", strength_end=1.0, enabled=False)):
        assert not off.active_model


def _on(total, *ranges):
    """The LoRAs on at each step, from each LoRA's (first, stop) steps."""
    return [[k for k, (a, b) in enumerate(ranges) if a <= s < b] for s in range(total)]


def test_switch_turns_give_each_lora_that_is_on_its_turns():
    A, B = 0, 1
    # every LoRA on throughout: the plain rule
    assert switch_turns(_on(9, (0, 9), (0, 9), (0, 9)), 2, 3) == [0, 0, 1, 1, 2, 2, 0, 0, 1]
    # B on steps 5-9 of 10, interval 3: turns at 0 and 3 are A's (B is off at 3), B takes the turn at 6
    assert switch_turns(_on(10, (0, 10), (5, 10)), 3, 2) == [A] * 6 + [B] * 3 + [A]
    # B on steps 10-14 of 20, interval 5: its one turn, whole
    assert switch_turns(_on(20, (0, 20), (10, 15)), 5, 2) == [A] * 10 + [B] * 5 + [A] * 5
    # A goes off in its turn: B's turn starts there; a step with no LoRA on has none
    assert switch_turns(_on(10, (0, 3), (0, 10)), 5, 2) == [A] * 3 + [B] * 7
    assert switch_turns(_on(6, (0, 2), (4, 6)), 2, 2) == [A, A, None, None, B, B]
    with pytest.raises(ValueError):
        switch_turns(_on(3, (0, 3)), 0, 1)


def test_switch_turns_carry_on_in_a_pass_that_continues_another():
    A, B, C = 0, 1, 2
    one_run = [A, A, A, B, B, B, C, C, C, A]  # three LoRAs, interval 3, ten steps (by hand)
    for cut in (1, 4, 5, 9):
        first = SwitchTurns(3, 3)
        head = [first.take({A, B, C}) for _ in range(cut)]
        second = SwitchTurns(3, 3, first.state)
        assert head + [second.take({A, B, C}) for _ in range(10 - cut)] == one_run
    # a second pass that does not continue starts over
    fresh = SwitchTurns(3, 3)
    assert [fresh.take({A, B, C}) for _ in range(5)] == one_run[:5]
