"""CMLoRA while the host samples: the dominant-weighted composite with cached deep features.

Every model call follows the step's plan (``cmlora_core.cmlora.Planner``): the LoRAs that
need a full pass run together in one forward over copies of the rows (their deep features
kept with cache "deep", their predictions with cache "prediction"); the others run a
shallow pass around their cached deep feature, or reuse their last prediction; the outputs
are mixed with the step's weights. Online mode watches the denoised image after each step
(a post-CFG function) and moves to the low-frequency LoRAs when its high frequencies fade.

The report gives the run's UNet FLOPs over merge's, from the pass counts and the cost of a
shallow pass relative to a full one, counted once on the meta device (no extra pass of the
real model).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ..cmlora_core.cmlora import OFF, REUSE, SHALLOW, Planner, Schedule, ScheduleMismatch, StepPlan, check_schedule
from ..cmlora_core.errors import CMLoRAError
from ..cmlora_core.spectrum import batch_score
from .loras import MappedLora
from .routed import ModelCall
from .runtime import RunTrace, Runtime, PatcherEntry
from .unet_split import capturing, find_split, shallow_forward, shallow_fraction


@dataclass
class _Handoff:
    """What a pass that left noise hands to the pass continuing it: the planners after its steps and every
    LoRA's cached features (keyed by the conds' places, which the next pass's conds share)."""

    planners: list
    deep: dict
    pred: dict


@dataclass
class CMLoRATrace(RunTrace):
    full_passes: int = 0  # LoRA evaluations per kind, summed over model calls
    shallow_passes: int = 0
    reused: int = 0
    shallow_fraction: float | None = None  # FLOPs of a shallow pass / a full pass
    switched_at: int | None = None  # online: first step of the low-frequency phase
    plans: dict = field(default_factory=dict)  # step -> StepPlan


class _ObserveDenoised(PatcherEntry):
    def __call__(self, args):
        return self.running(args["model_options"]["transformer_options"]).observe_denoised(args)


class CMLoRARuntime(Runtime):
    method = "cmlora"
    trace_type = CMLoRATrace
    whole_runs_only = True
    whole_run_fix = ("sample in one pass, or split a run of one of the host's schedulers (KSamplerAdvanced with the "
                     "same steps and scheduler in both passes), or use method 'switch', 'composite' or 'merge', which "
                     "need no step count.")
    handoffs_kept = 2  # a handoff holds every LoRA's cached deep features

    def __init__(self, loras: list[MappedLora], node: str, schedule: Schedule | None):
        if schedule is None:
            raise CMLoRAError(node, "schedule", "method 'cmlora' needs a schedule.",
                              "connect a 'CMLoRA Frequency Scheduler' (fed by a 'CMLoRA LoRA Profiler', or by the stack).")
        self.schedule = schedule
        super().__init__(loras, node)
        self._check(total=None)

    def _check(self, total: int | None) -> None:
        try:
            check_schedule(self.schedule, [ml.entry.name for ml in self.loras], total)
        except ScheduleMismatch as e:
            raise CMLoRAError(self.node, e.input, e.problem, e.fix) from None

    def _reset(self) -> None:
        super()._reset()
        self._planners: list[Planner] = []  # one per step count the whole run may have (Runtime.totals)
        self._split = None
        self._deep: dict = {}  # (lora, call key) -> deep feature of its last full pass
        self._pred: dict = {}  # (lora, call key) -> its last full prediction (cache "prediction")

    def register(self, clone) -> None:
        if self.schedule.settings.mode == "online":
            clone.set_model_sampler_post_cfg_function(_ObserveDenoised(self.node))

    def begin_run(self, model_patcher) -> None:
        self._planners, self._deep, self._pred = [], {}, {}

    def placed(self, noise) -> None:
        """The planners of the whole run, one per step count it may have: new ones, or those of the pass this
        one continues (copied: that pass may be continued again) with its caches, told this pass's LoRAs on."""
        self._check(min(self.totals))
        on = self.on_sets()
        if self.handoff is None:
            self._planners = [Planner(self.schedule, t, None if on is None else list(on)) for t in self.totals]
            return
        state: _Handoff = self.handoff.state
        self._planners = [copy.deepcopy(p) for p in state.planners if p.total in self.totals]
        for p in self._planners:
            if on is not None:
                p.on = p.on + list(on)
        self._deep, self._pred = dict(state.deep), dict(state.pred)

    def handoff_state(self):
        return _Handoff(self._planners, self._deep, self._pred)

    def end_run(self, out) -> None:
        if self._planners:
            self.trace.switched_at = self._planners[0].switched_at

    def cleanup(self) -> None:
        self._deep, self._pred = {}, {}

    def _plan(self, step: int) -> StepPlan:
        """The plan of the pass's ``step`` (the whole run's ``offset + step``), the same for every step count
        the run may have, or a stop."""
        at = self.offset + step
        plans = [p.plan(at) for p in self._planners]
        plan = plans[0]
        for other in plans[1:]:
            if (other.dominant, other.weights, other.passes) != (plan.dominant, plan.weights, plan.passes):
                raise self.split_ambiguity("CMLoRA plans", at)
        return plan

    def model_call(self, executor, call: ModelCall, step: int):
        trace = self.trace
        plan = self._plan(step)
        trace.plans[plan.step] = plan
        if plan.dominant is None:  # no LoRA is on at this step: the base model
            trace.call_rows.append(call.rows)
            return self.finite(call.run(executor), [], step)
        cache = self.schedule.settings.cache
        if cache == "deep" and self._split is None:
            self._split = find_split(executor.class_obj, self.node)
        if cache == "deep" and trace.shallow_fraction is None:
            trace.shallow_fraction = shallow_fraction(self.base_model, self._split, call.x, call.context, call.y)
        key = (tuple(self.cond_order.get(u, u) for u in call.options.get("uuids", [])), call.rows)
        full, shallow, reuse = [], [], []
        for i, kind in enumerate(plan.passes):
            if kind == OFF:
                continue
            if kind == SHALLOW and (i, key) in self._deep:
                shallow.append(i)
            elif kind == REUSE and (i, key) in self._pred:
                reuse.append(i)
            else:  # FULL, or nothing cached for this call yet
                full.append(i)
        outs = {}
        if full:
            outs.update(self._full(executor, call, full, key, cache))
        if shallow:
            outs.update(self._shallow(executor.class_obj, call, shallow, key))
        for i in reuse:
            outs[i] = self._pred[(i, key)]
        trace.full_passes += len(full)
        trace.shallow_passes += len(shallow)
        trace.reused += len(reuse)
        indices = sorted(outs)
        mixed = sum(plan.weights[i] * outs[i] for i in indices)
        return self.finite(mixed, indices, step, blocks=[outs[i] for i in indices])

    def _full(self, executor, call: ModelCall, indices: list[int], key, cache: str) -> dict:
        """Full passes of ``indices`` in one forward; keeps what the cache needs."""
        sink: list = []
        if cache == "deep":
            call = call.replaced(options=capturing(call.options, self._split, sink))
        out = self.evaluate(executor, call, indices).chunk(len(indices))
        deep = sink[0].chunk(len(indices)) if sink else [None] * len(indices)
        for i, o, d in zip(indices, out, deep):
            if d is not None:
                self._deep[(i, key)] = d
            if cache == "prediction":
                self._pred[(i, key)] = o
        return dict(zip(indices, out))

    def _shallow(self, unet, call: ModelCall, indices: list[int], key) -> dict:
        """Shallow passes of ``indices`` around their cached deep features, in one forward."""
        self.trace.call_rows.append(call.rows * len(indices))
        copies = call.copies(len(indices))
        deep = torch.cat([self._deep[(i, key)] for i in indices])
        with self.routed.routed(self.routed.blocks(call.rows, indices)):
            out = shallow_forward(unet, self._split, copies.x, copies.timesteps, copies.context, copies.y, deep,
                                  copies.options, copies.control)
        return dict(zip(indices, out.chunk(len(indices))))

    def observe_denoised(self, args):
        """Post-CFG function (online mode): tell the planner how much high frequency x0 still has."""
        denoised = args["denoised"]
        if self._planners and self._sigmas:
            step = self.offset + self.step_of(args["model_options"]["transformer_options"], args["sigma"])
            share = batch_score(denoised.detach().float().cpu())
            for planner in self._planners:
                planner.observe(step, share)
        return denoised

    # ---------------------------------------------------------------- report
    @staticmethod
    def flop_ratio(trace: CMLoRATrace) -> float | None:
        """UNet FLOPs of the run over merge's (one full pass per model call); LoRA deltas not counted."""
        if not trace.model_calls:
            return None
        f = trace.shallow_fraction if trace.shallow_fraction is not None else 0.0
        return (trace.full_passes + f * trace.shallow_passes) / trace.model_calls

    def details(self, trace: CMLoRATrace) -> str:
        settings = self.schedule.settings
        text = (f", passes: {trace.full_passes} full, {trace.shallow_passes} shallow, {trace.reused} reused"
                f" ({settings.mode}, cache {settings.cache})")
        if settings.mode == "online":
            text += (f"; switched to the low-frequency LoRAs at step {trace.switched_at}"
                     if trace.switched_at is not None else "; never switched to the low-frequency LoRAs")
        ratio = self.flop_ratio(trace)
        if ratio is not None:
            if trace.shallow_fraction is not None:
                text += f"; a shallow pass costs {trace.shallow_fraction:.3f} of a full pass"
            text += f"; this run took {ratio:.3f}x the model FLOPs of merge (composite: {len(self.loras)}x)"
        return text
