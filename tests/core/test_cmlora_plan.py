"""CMLoRA schedules and spectra (host-free)."""
from __future__ import annotations

import math

import pytest
import torch

from cmlora_core.cmlora import (FULL, OFF, REUSE, SHALLOW, Planner, Schedule, ScheduleSettings, dominant_weight,
                                refresh_steps, sets_from_categories, split_sets, step_weights, check_schedule)
from cmlora_core.spectrum import high_frequency_score, image_score, radial_profile


def planner(high, low, total, **settings):
    return Planner(Schedule(ScheduleSettings(**settings), tuple(high), tuple(low), tuple("abcde"[: len(high) + len(low)])), total)


def test_refresh_clocks():
    assert refresh_steps(10, "uniform", 3) == [0, 3, 6, 9]
    # nonuniform: the reference's three ranges (tests/core/test_reference_measures.py checks them in full)
    assert refresh_steps(40, "nonuniform") == [0, 2, 4, 6, 8, 10, 12, 14, 15, 18, 21, 24, 27, 30, 33, 35, 37, 39]


def test_dominant_weights():
    assert step_weights(3, 1, 2.5) == pytest.approx([1 / 4.5, 2.5 / 4.5, 1 / 4.5])
    assert dominant_weight("constant", 4, 7, 10) == 3.5
    assert dominant_weight("decay", 3, 0, 10) == 2.5 and dominant_weight("decay", 3, 9, 10) == 1.0


def test_sets():
    h, low = split_sets([0.30, 0.10, 0.45, 0.20], baseline=0.25, categories=["auto", "auto", "auto", "auto"])
    assert (h, low) == ([2, 0], [3, 1])
    h, low = split_sets([0.30, 0.10, 0.45, 0.20], 0.25, ["background", "character", "auto", "auto"])
    assert (h, low) == ([2, 1], [0, 3])  # categories override the measurement
    assert sets_from_categories(["character", "background", "style"]) == ([0, 2], [1])


def test_offline_schedule_rotates_at_refresh_steps_and_switches_at_fraction():
    p = planner([0, 1], [2], 10, mode="offline", refresh="uniform", refresh_interval=2, dominant_full=False)
    plans = [p.plan(i) for i in range(10)]
    assert [x.dominant for x in plans] == [0, 0, 1, 1, 0, 0, 2, 2, 2, 2]
    assert [x.phase for x in plans] == ["H"] * 6 + ["L"] * 4  # ceil(0.55 * 10) = 6
    assert plans[0].passes == [FULL] * 3  # every LoRA gets a full pass at the first step
    assert plans[1].passes == [SHALLOW] * 3  # reference behaviour: even the dominant runs shallow
    assert plans[2].passes == [SHALLOW, FULL, SHALLOW]  # the refresh step's new dominant is refreshed
    assert plans[6].passes == [SHALLOW, SHALLOW, FULL]  # phase change: the new dominant is refreshed
    assert plans[3].weights == pytest.approx(step_weights(3, 1, 2.5))


def test_dominant_full_gives_the_dominant_a_full_pass_every_step():
    p = planner([0, 1], [2], 10, refresh="uniform", refresh_interval=2, dominant_full=True)
    for i in range(10):
        plan = p.plan(i)
        assert plan.passes[plan.dominant] == FULL
        if i > 0:
            assert plan.passes.count(FULL) == 1


def test_async_decouples_dominant_and_refresh_clocks():
    p = planner([0, 1], [2], 12, mode="async", switch_interval=3, refresh="uniform", refresh_interval=2,
                dominant_full=False)
    plans = [p.plan(i) for i in range(12)]
    assert [x.dominant for x in plans] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 0, 0]
    refreshed = {i: [k for k, ps in enumerate(x.passes) if ps == FULL] for i, x in enumerate(plans) if i > 0}
    # refresh steps 2, 4, 6, 8, 10 refresh LoRAs 0, 1, 2, 0, 1 in order, whoever dominates
    assert {i: r for i, r in refreshed.items() if r} == {2: [0], 4: [1], 6: [2], 8: [0], 10: [1]}


def test_online_switch_point_moves_with_threshold():
    def switch_step(threshold):
        p = planner([0, 1], [2], 20, mode="online", online_threshold=threshold)
        share = 1.0
        for i in range(20):
            plan = p.plan(i)
            if plan.phase == "L":
                return i
            share *= 0.8  # the predicted x0 gets smoother as sampling goes on
            p.observe(i, share)
        return None

    assert switch_step(0.0) is None  # 0 never switches
    early, late = switch_step(0.6), switch_step(0.2)
    assert early is not None and late is not None and early < late


def test_cache_modes():
    none = planner([0, 1], [2], 6, cache="none", dominant_full=False)
    assert all(none.plan(i).passes == [FULL] * 3 for i in range(6))
    pred = planner([0, 1], [2], 6, cache="prediction", dominant_full=False, refresh="uniform", refresh_interval=2)
    assert pred.plan(1).passes == [REUSE] * 3


def test_plan_is_stable_for_repeated_and_skipped_lookups():
    p = planner([0, 1], [2], 10, refresh="uniform", refresh_interval=2)
    late = p.plan(5)
    assert p.plan(5) is late and p.plan(3).step == 3


def test_check_schedule():
    s = Schedule(ScheduleSettings(), (0,), (), ("a",))
    with pytest.raises(ValueError, match="at least 2"):
        check_schedule(s, ("a",), 10)
    s = Schedule(ScheduleSettings(), (0, 1), (2,), ("a", "b", "c"))
    with pytest.raises(ValueError, match="at least 3 steps"):
        check_schedule(s, ("a", "b", "c"), 2)
    with pytest.raises(ValueError, match="made for the LoRAs"):
        check_schedule(s, ("a", "c", "b"))
    check_schedule(s, ("a", "b", "c"), 3)


def test_spectrum_orders_edges_above_flat_colour():
    torch.manual_seed(0)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 64, 64), 9, 1, 4)[0]
    edges = torch.rand(3, 64, 64)
    prof = radial_profile(edges.mean(0))
    assert prof.shape == (46,) and math.isclose(float(prof.abs().max()), 1.0)  # rings 0..45: to the corner
    assert image_score(edges) > image_score(smooth)
    # scale-free: the same content at half the resolution keeps its order
    assert image_score(edges[:, ::2, ::2]) > image_score(smooth[:, ::2, ::2])
    assert high_frequency_score(torch.tensor([1.0, 0.5, 0.2, 0.1, 0.0]), 0.5) == pytest.approx(0.1)


def _ranged(high, low, on, **settings):
    sched = Schedule(ScheduleSettings(**settings), tuple(high), tuple(low), tuple("abcde"[: len(high) + len(low)]))
    return Planner(sched, len(on), on)


def test_only_the_loras_on_at_a_step_lead_weigh_and_cost_a_pass():
    A, B = 0, 1
    settings = dict(mode="offline", h_to_l_fraction=0.5, cache="deep", refresh="uniform", refresh_interval=2)
    # A (high frequency) on the first half only: it leads steps 0-2 beside B (w_dom 1.5 over 2.5), then is
    # off; B alone carries steps 3-5 with weight 1, and A costs no pass there
    p = _ranged([A], [B], [{A, B}] * 3 + [{B}] * 3, **settings)
    plans = [p.plan(i) for i in range(6)]
    assert [q.dominant for q in plans] == [A, A, A, B, B, B]
    assert [q.weights for q in plans[:3]] == [pytest.approx([0.6, 0.4])] * 3
    assert [q.weights for q in plans[3:]] == [[0.0, 1.0]] * 3
    assert [q.passes[A] for q in plans] == [FULL, FULL, FULL, OFF, OFF, OFF]  # the dominant's full pass
    assert [q.passes[B] for q in plans] == [FULL, SHALLOW, SHALLOW, FULL, FULL, FULL]
    # A on the second half only: B leads the early steps, A comes on with a full pass and shares the late ones
    p = _ranged([A], [B], [{B}] * 3 + [{A, B}] * 3, **settings)
    plans = [p.plan(i) for i in range(6)]
    assert [q.dominant for q in plans] == [B] * 6
    assert [q.passes[A] for q in plans] == [OFF, OFF, OFF, FULL, SHALLOW, SHALLOW]
    assert plans[3].weights == pytest.approx([0.4, 0.6])
    # a step with no LoRA on has no dominant and no pass
    p = _ranged([A], [B], [{A}, set(), {B}])
    assert p.plan(1).dominant is None and p.plan(1).passes == [OFF, OFF] and p.plan(1).weights == [0.0, 0.0]
    assert p.plan(2).dominant == B and p.plan(2).passes[B] == FULL
