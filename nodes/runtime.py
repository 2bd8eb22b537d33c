"""What every composing method shares while the host samples: the runtime on a patcher clone.

A method that composes LoRAs per step or per row (switch, composite, CMLoRA, CLoRA) is a
``Runtime`` subclass attached to a ``ModelPatcher`` clone. The clone carries:

* an ``OUTER_SAMPLE`` wrapper that brackets each run: fresh per-run state before it, the
  model restored after it, whether the run finished, failed or was interrupted;
* a ``DIFFUSION_MODEL`` wrapper that hands every model call to the method's
  ``model_call`` with the step it belongs to (found by sigma, never by counting calls);
* an injection that installs the routed-LoRA hooks while the host has the model loaded;
* where one forward runs several copies of the rows, wrappers that tell the host's memory
  estimates so.

Keys. Wrappers and injections are registered under a key of the runtime's own
(``comfyui_cmlora.<method>.<n>``), the runtime under the attachment ``comfyui_cmlora.runtime``:
other packs' wrappers on the same model are left alone, and a model that already composes
a stack is refused before anything is registered (one runtime would run inside the other).

Clones. Cloning the patcher gives the clone a runtime of its own (``on_model_patcher_clone``:
same LoRAs and settings, built deltas shared, no per-run state shared). What is registered
on the patcher is plain data (the node's name) that finds the runtime of the patcher being
sampled, never a bound method: hosts copy those entries between clones differently.
"""
from __future__ import annotations

import copy
import itertools
import logging
import time
from dataclasses import dataclass, field

import torch

from ..cmlora_core.errors import CMLoRAError
from ..cmlora_core.stack import strength_table
from ..cmlora_core.steps import MAX_STEPS, NoiseSteps, StepClock, num_steps, same_sigma, step_index
from . import host
from .loras import MappedLora
from .routed import ModelCall, RoutedLoras

log = logging.getLogger("cmlora")

PACK = "comfyui_cmlora"
ATTACHMENT = f"{PACK}.runtime"  # the runtime on its patcher
RUNNING = f"{PACK}.running"  # the runtime of the run in progress, in transformer_options
_serial = itertools.count(1)

NONFINITE_FIX = ("lower the LoRAs' strength_model (or cfg); if the base model alone does this, run it in fp32 "
                 "(--force-fp32) or with another sampler.")


def new_key(kind: str) -> str:
    """A wrapper key of the pack's own, distinct for every runtime (and every merge)."""
    return f"{PACK}.{kind}.{next(_serial)}"


def _same_latent(kept: torch.Tensor, latent: torch.Tensor) -> bool:
    """Whether a pass starts from the latent a pass ended with: the host takes a sampler's latent out of the
    model's scale and the next pass's back in (SD1.5: divided and multiplied by 0.18215), to float rounding."""
    kept = kept.to(latent.device, latent.dtype)
    return bool(torch.allclose(latent, kept, rtol=1e-4, atol=1e-6 * (1.0 + float(kept.abs().max()))))


def runtime_of(model_patcher) -> "Runtime | None":
    """The pack's runtime attached to a model (None for a plain or merge-patched model)."""
    return model_patcher.get_attachment(ATTACHMENT)


def check_finite(out: torch.Tensor, node: str, labels: list[str], blocks=None, where: str = "",
                 by: str = "from") -> torch.Tensor:
    """``out``, or a stop naming what made it NaN or infinite. One reduction per model call; only
    when it fails are the ``blocks`` (default: ``out`` split in one block of rows per label) looked at."""
    if out.is_meta or bool(torch.isfinite(out).all()):
        return out
    blocks = blocks if blocks is not None else out.chunk(len(labels))
    bad = [label for label, o in zip(labels, blocks) if not bool(torch.isfinite(o).all())]
    who = (", ".join(bad) if len(bad) < len(labels) or len(labels) == 1
           else f"every row ({', '.join(bad)}), so the base model or the settings are the likelier cause")
    raise CMLoRAError(node, "stack", f"the prediction{where} holds NaN or infinite values {by} {who}.", NONFINITE_FIX)


# ---------------------------------------------------------------- what the patcher holds

class PatcherEntry:
    """A wrapper, patch or callback on the patcher: the node's name and a way to the runtime."""

    def __init__(self, node: str):
        self.node = node

    def running(self, transformer_options: dict) -> "Runtime":
        runtime = transformer_options.get(RUNNING)
        if runtime is None:
            raise CMLoRAError(self.node, "model",
                              "the patched model was called outside a sampler run, so the step and the LoRAs are "
                              "unknown.", "sample it with KSampler, KSamplerAdvanced or SamplerCustomAdvanced.")
        return runtime


class _OuterSample(PatcherEntry):
    def __call__(self, executor, *args, **kwargs):
        guider = executor.class_obj
        runtime = runtime_of(guider.model_patcher)
        guider.model_options.setdefault("transformer_options", {})[RUNNING] = runtime
        return runtime.outer_sample(executor, *args, **kwargs)


class _SamplerSample(PatcherEntry):
    def __call__(self, executor, *args, **kwargs):
        extra_args = kwargs["extra_args"] if "extra_args" in kwargs else args[2]
        return self.running(extra_args["model_options"]["transformer_options"]).sampler_sample(executor, *args, **kwargs)


class _PredictNoise(PatcherEntry):
    """One evaluation of the sampler (all model calls of one denoised prediction)."""

    def __call__(self, executor, x, timestep, model_options, *args, **kwargs):
        self.running(model_options["transformer_options"]).evaluation(model_options["transformer_options"], timestep)
        return executor(x, timestep, model_options, *args, **kwargs)


class _DiffusionModel(PatcherEntry):
    def __call__(self, executor, *args, **kwargs):
        call = ModelCall.of(executor, args, kwargs)
        return self.running(call.options).diffusion_model(executor, call)


class _PrepareSampling(PatcherEntry):
    """Tell the host's memory estimate how many rows each model call really has."""

    def __call__(self, executor, model, noise_shape, *args, **kwargs):
        factor = runtime_of(model).row_factor()
        return executor(model, [noise_shape[0] * factor, *noise_shape[1:]], *args, **kwargs)


class _CalcCondBatch(PatcherEntry):
    """While the host sizes its batches of conds, its estimate counts the copies of every row.

    Set on the base model for this call only (not as an object patch, which would stay on the
    model after the run and inflate the next plain run's estimate)."""

    def __call__(self, executor, model, *args, **kwargs):
        options = kwargs["model_options"] if "model_options" in kwargs else args[3]
        runtime = self.running(options["transformer_options"])
        previous = model.__dict__.get("memory_required")  # another pack's object patch, if any
        model.memory_required = RowsScaled(model.memory_required, runtime.row_factor())
        try:
            return executor(model, *args, **kwargs)
        finally:
            if previous is None:
                del model.memory_required  # back to the class's method
            else:
                model.memory_required = previous


class RowsScaled:
    """``memory_required`` of a model whose every call runs ``factor`` copies of its rows."""

    def __init__(self, original, factor: int):
        self.original, self.factor = original, factor

    def __call__(self, input_shape, *args, **kwargs):
        return self.original([input_shape[0] * self.factor, *input_shape[1:]], *args, **kwargs)


def _inject(model_patcher):
    runtime_of(model_patcher).inject(model_patcher)


def _eject(model_patcher):
    runtime_of(model_patcher).eject(model_patcher)


# ---------------------------------------------------------------- the runtime

@dataclass
class RunTrace:
    """What one sampling run did (read by reports, tests and the benchmark)."""

    steps: int = 0
    model_calls: int = 0
    call_rows: list = field(default_factory=list)  # rows of every forward the method ran
    seconds: float = 0.0
    status: str = "running"
    strengths: dict = field(default_factory=dict)  # step -> model strength per LoRA (LoRAs with step ranges)


@dataclass
class Handoff:
    """Where a pass that stopped with noise left stood (KSamplerAdvanced's ``end_at_step`` with leftover
    noise, SplitSigmas). A pass continues it when it starts at that noise level, adds no noise, and starts
    from the latent that pass ended with (as the host hands it on): another image's pass, an img2img pass
    that adds noise, or a latent changed in between (upscaled) starts afresh."""

    sigma: float  # the noise level the pass stopped at
    latent: torch.Tensor  # the latent it ended with, as its sampler returned it
    done: int  # steps of the whole run sampled so far
    totals: tuple[int, ...]  # the step counts the whole run may have (methods that plan over it), else ()
    state: object = None  # the method's own: switch's turns, CMLoRA's planners and caches


class Runtime:
    """Per-clone state of one composing method; subclasses give ``model_call`` and ``details``."""

    method = ""
    trace_type = RunTrace
    # a method whose plan needs the whole run's step count (CMLoRA, CLoRA) finds it for a pass that leaves
    # noise from the host's schedulers (``host.run_totals``); the others need no count (ranges are measured
    # on the noise level); every method carries its state on into the next pass through a ``Handoff``
    whole_runs_only = False
    whole_run_fix = ""
    handoffs_kept = 8  # the latest passes a later pass may continue (several workflows, or one queued again)

    def __init__(self, loras: list[MappedLora], node: str):
        self.loras, self.node = loras, node  # node: the node that made this runtime, named in its errors
        self.key = new_key(self.method)
        self.routed = RoutedLoras(loras, node)
        self._handoffs: list[Handoff] = []  # shared by the clones of this model (a later pass may sample a clone)
        self.scheduled = any(ml.entry.scheduled for ml in loras)  # a LoRA has a step range or curve
        self.last_trace: RunTrace | None = None
        self._reset()

    def _reset(self) -> None:
        """Fresh per-run state (also what a clone of the patcher starts with)."""
        self.trace: RunTrace | None = None
        self.base_model = None
        self._sigmas_of, self._sigmas = None, []
        self.sampler_name = ""  # the sampler function of the run (e.g. "sample_euler")
        self._clock = StepClock()
        self._evaluation: tuple[float, int] | None = None  # (sigma, step) of the evaluation in progress
        self._placed_for = None  # the sample_sigmas the run's steps were placed for (Runtime.place)
        self.noise: NoiseSteps | None = None  # the run's steps on the noise level
        self._strengths: list[tuple[float, ...]] | None = None  # each LoRA's strength per step (ranges, curves)
        self._on_sets: list[set[int]] | None = None  # the LoRAs on per step (ranges, curves)
        self.latent_hw: tuple[int, int] | None = None  # the run's latent height and width
        self.cond_areas: dict = {}  # cond uuid -> its area (the crop the host feeds the model for it)
        self.cond_order: dict = {}  # cond uuid -> its place in the sampler's inputs (host.cond_order)
        self.handoff: Handoff | None = None  # the earlier pass this one continues
        self._pass_latent: torch.Tensor | None = None  # what this pass's sampler returned
        self.offset = 0  # steps of the whole run sampled before this pass
        self.totals: tuple[int, ...] = ()  # the whole run's possible step counts (whole_runs_only)

    def on_model_patcher_clone(self):
        """The host calls this when the patcher is cloned: the clone gets its own runtime."""
        twin = copy.copy(self)
        twin.routed = self.routed.for_clone()
        twin.last_trace = None
        twin._reset()
        return twin

    # ---------------------------------------------------------------- installation
    def attach(self, clone) -> None:
        existing = runtime_of(clone)
        if existing is not None:
            raise CMLoRAError(self.node, "model",
                              f"this model already composes a LoRA stack with {existing.node} (method "
                              f"'{existing.method}'); a second composing node on top would run inside the first.",
                              f"put all LoRAs into one stack, or feed {self.node} the model from before "
                              f"{existing.node}. LoraLoader and method 'merge' may sit before or after it.")
        clone.add_wrapper_with_key(host.WrappersMP.OUTER_SAMPLE, self.key, _OuterSample(self.node))
        clone.add_wrapper_with_key(host.WrappersMP.SAMPLER_SAMPLE, self.key, _SamplerSample(self.node))
        clone.add_wrapper_with_key(host.WrappersMP.PREDICT_NOISE, self.key, _PredictNoise(self.node))
        clone.add_wrapper_with_key(host.WrappersMP.DIFFUSION_MODEL, self.key, _DiffusionModel(self.node))
        clone.set_injections(self.key, [host.PatcherInjection(_inject, _eject)])
        if self.row_factor() > 1:  # the host's memory estimates learn that every model call runs copies
            clone.add_wrapper_with_key(host.WrappersMP.PREPARE_SAMPLING, self.key, _PrepareSampling(self.node))
            clone.add_wrapper_with_key(host.WrappersMP.CALC_COND_BATCH, self.key, _CalcCondBatch(self.node))
        self.register(clone)
        clone.set_attachments(ATTACHMENT, self)

    def register(self, clone) -> None:
        """Method-specific patches and wrappers (none by default)."""

    def row_factor(self) -> int:
        """The most copies of a model call's rows that one forward of this method runs."""
        return len(self.loras)

    def inject(self, model_patcher) -> None:
        self.routed.install(model_patcher.model)

    def eject(self, model_patcher) -> None:
        self.routed.remove()

    # ---------------------------------------------------------------- one run
    def outer_sample(self, executor, *args, **kwargs):
        patcher = executor.class_obj.model_patcher
        self.base_model = patcher.model
        self.trace = self.trace_type()
        self._placed_for = None
        self.begin_run(patcher)
        started = time.perf_counter()
        try:
            out = executor(*args, **kwargs)
            self.trace.status = "finished"
            self.end_run(out)
            self._hand_off()
            return out
        except BaseException as e:
            self.trace.status = f"stopped ({type(e).__name__})"
            raise
        finally:
            self.routed.routing = None
            self.cleanup()
            self.trace.seconds = time.perf_counter() - started
            self.last_trace, self.trace = self.trace, None
            log.info("CMLoRA %s: %s", self.method, self.report(self.last_trace))

    def begin_run(self, model_patcher) -> None:
        """Before the run (the model is not loaded yet)."""

    def end_run(self, out: torch.Tensor) -> None:
        """After a run that finished."""

    def cleanup(self) -> None:
        """After every run, finished or not: drop per-run state, put the model back."""

    def sampler_sample(self, executor, *args, **kwargs):
        """The sampler's run: its function decides how evaluations map to steps (``StepClock``)."""
        self.sampler_name = getattr(getattr(executor.class_obj, "sampler_function", None), "__name__", "")
        self._clock, self._evaluation = StepClock(self.sampler_name), None
        guider, sigmas, noise, latent = host.sampler_sample_args(args, kwargs)
        self.latent_hw = tuple(noise.shape[-2:]) if torch.is_tensor(noise) else None
        self.cond_areas = host.cond_areas(guider)
        self.cond_order = host.cond_order(guider)
        self.handoff, self.offset, self.totals, self._pass_latent = None, 0, (), None
        if torch.is_tensor(sigmas) and sigmas.numel() > 1:
            self._begin_pass(sigmas.reshape(-1).tolist(), noise, latent, executor.class_obj)
        out = executor(*args, **kwargs)
        self._pass_latent = out
        return out

    def _continued(self, first: float, noise, latent) -> Handoff | None:
        """The hand-over this pass continues (see ``Handoff``); one comparison of latents per pass."""
        if not torch.is_tensor(noise) or not torch.is_tensor(latent):
            return None
        candidates = [h for h in reversed(self._handoffs) if same_sigma(first, h.sigma) and h.latent.shape == latent.shape]
        if not candidates or bool(noise.any()):
            return None
        return next((h for h in candidates if _same_latent(h.latent, latent)), None)

    def _begin_pass(self, points: list[float], noise, latent, sampler=None) -> None:
        """Before the pass samples: the earlier pass it continues (``_continued``) and, for a method that
        plans over the whole run, that run's step count — every count that fits (``host.run_totals``); the
        method checks they plan alike."""
        first, last, k = points[0], points[-1], len(points) - 1
        self.handoff = self._continued(first, noise, latent)
        self.offset = self.handoff.done if self.handoff is not None else 0
        if not self.whole_runs_only:
            return
        if self.handoff is not None:
            totals = self.handoff.totals
        elif last > 0:
            sampling = getattr(self.base_model, "model_sampling", None)
            totals = host.run_totals(sampling, points, sampler) if sampling is not None else ()
            if not totals:
                raise CMLoRAError(self.node, "model", f"method '{self.method}' plans over the whole run, and this pass "
                                  f"stops at noise level {last:.3g} with noise left for another pass; its noise levels "
                                  f"are not the first steps of a run of any of the host's schedulers (up to {MAX_STEPS} "
                                  "steps), so the steps that follow are unknown.", self.whole_run_fix)
        else:
            totals = (k,)
        done = self.offset + k
        self.totals = tuple(t for t in totals if (t > done if last > 0 else t == done))
        if not self.totals:
            raise CMLoRAError(self.node, "model", f"this pass continues the pass that stopped at noise level "
                              f"{first:.3g}, part of a run of {' or '.join(map(str, totals))} steps, but "
                              + (f"it finishes that run after {done} steps." if last <= 0
                                 else f"it is still going after {done} steps."),
                              "give every KSamplerAdvanced of the split run the same model, steps, sampler and "
                              "scheduler, and let the last one finish the run (end_at_step 10000).")

    def split_ambiguity(self, what: str, step: int) -> CMLoRAError:
        """The stop for a pass whose possible runs (``totals``) plan ``what`` differently at ``step``."""
        return CMLoRAError(self.node, "model", f"this pass stops with noise left, and its noise levels begin runs of "
                           f"{' and '.join(map(str, self.totals))} steps alike, whose {what} differ at step {step}, so "
                           "this pass's are unknown.", "sample in one pass, or end the first pass at another step.")

    def _hand_off(self) -> None:
        """After a finished pass that left noise: what the pass continuing from there needs."""
        sigmas, latent = self._sigmas, self._pass_latent
        if self._placed_for is None or len(sigmas) < 2 or sigmas[-1] <= 0 or not torch.is_tensor(latent):
            return
        handoff = Handoff(sigmas[-1], latent.detach(), self.offset + num_steps(sigmas), self.totals,
                          self.handoff_state())
        kept = [h for h in self._handoffs if not (same_sigma(h.sigma, handoff.sigma) and h.latent.shape == latent.shape
                                                  and _same_latent(h.latent, latent))]
        self._handoffs[:] = kept[max(0, len(kept) - self.handoffs_kept + 1):] + [handoff]

    def handoff_state(self):
        """The method's state at the end of a pass that left noise (None: it keeps none)."""
        return None

    def evaluation(self, options: dict, sigma) -> None:
        """The sampler evaluates the model at ``sigma``: fix the step of every model call it makes."""
        if "sample_sigmas" in options:
            sig = float(sigma.reshape(-1)[0]) if torch.is_tensor(sigma) else float(sigma)
            self._evaluation = (sig, self._clock.step(self.run_sigmas(options["sample_sigmas"]), sig))

    def step_of(self, options: dict, sigma=None) -> int:
        """The step a model call belongs to: its evaluation's (Heun's corrector belongs to the step it
        corrects), or by sigma for a call made outside a sampler evaluation."""
        if "sample_sigmas" not in options:
            raise CMLoRAError(self.node, "model",
                              "the sampler did not pass its sigma schedule to the model, so the step is unknown.",
                              "sample with KSampler, KSamplerAdvanced or SamplerCustomAdvanced.")
        sigmas = self.run_sigmas(options["sample_sigmas"])
        sig = float((options["sigmas"] if sigma is None else sigma).reshape(-1)[0])
        if self._evaluation is not None and same_sigma(self._evaluation[0], sig):
            return self._evaluation[1]
        return step_index(sigmas, sig)

    def diffusion_model(self, executor, call: ModelCall) -> torch.Tensor:
        options = call.options
        step = self.step_of(options)
        sigmas = self._sigmas
        if self.trace is None:  # a call outside this runtime's bracket (another guider's run)
            self.trace = self.trace_type()
        self.trace.steps = num_steps(sigmas)
        self.trace.model_calls += 1
        host.throw_if_interrupted()
        self.place(options["sample_sigmas"])
        if self._strengths is not None:
            self.routed.strengths = self._strengths[step]
            self.trace.strengths[step] = self._strengths[step]
        return self.model_call(executor, call, step)

    def place(self, sample_sigmas) -> None:
        """Once per run: its steps on the noise level (``NoiseSteps``, measured with the model's
        ``percent_to_sigma``, as the host measures ControlNet's and the conds' ranges), each LoRA's
        strength at each step and the LoRAs on there (``stack.strength_table``), then ``placed``."""
        if self._placed_for is sample_sigmas:
            return
        self._placed_for = sample_sigmas
        sampling = getattr(self.base_model, "model_sampling", None)
        sigmas = self.run_sigmas(sample_sigmas)
        self.noise = (NoiseSteps.of(sigmas, sampling.percent_to_sigma) if sampling is not None
                      else NoiseSteps.even(num_steps(sigmas)))
        if self.whole_runs_only and not self.totals:  # a call outside the host's sampler wrapper: this pass alone
            self.totals = (num_steps(sigmas),)
        if self.scheduled:
            self._strengths = strength_table([ml.entry for ml in self.loras], self.noise)
            self._on_sets = [{i for i, v in enumerate(row) if v != 0.0} for row in self._strengths]
        self.placed(self.noise)

    def placed(self, noise: NoiseSteps) -> None:
        """After ``place``: method-specific per-run plans (none by default)."""

    def on_sets(self) -> list[set[int]] | None:
        """The LoRAs on at each step of the run (outside its range, or where its curve passes through 0,
        a LoRA is off); None when no LoRA has a range or curve (all on throughout)."""
        return self._on_sets if self.scheduled else None

    def on_at(self, step: int) -> list[int]:
        """The LoRAs on at ``step``, in stack order."""
        sets = self.on_sets()
        return list(range(len(self.loras))) if sets is None else sorted(sets[step])

    def model_call(self, executor, call: ModelCall, step: int) -> torch.Tensor:
        raise NotImplementedError

    def run_sigmas(self, sample_sigmas) -> list[float]:
        """The run's sigma schedule as floats, read from the device once per run."""
        if self._sigmas_of is not sample_sigmas:
            self._sigmas_of, self._sigmas = sample_sigmas, sample_sigmas.reshape(-1).tolist()
        return self._sigmas

    def evaluate(self, executor, call: ModelCall, indices: list[int]) -> torch.Tensor:
        """The call's rows once per LoRA in ``indices``, in one forward (blocks in that order)."""
        self.trace.call_rows.append(call.rows * len(indices))
        return self.routed.forward(executor, call, indices)

    def finite(self, out: torch.Tensor, indices: list[int], step: int, blocks=None) -> torch.Tensor:
        labels = [f"LoRA '{self.loras[i].entry.name}'" for i in indices] or ["the base model (no LoRA is on at this step)"]
        return check_finite(out, self.node, labels, blocks, f" at step {step}")

    # ---------------------------------------------------------------- report
    def report(self, trace: RunTrace | None) -> str:
        """One line on a run: the common counts, then the method's own."""
        if trace is None:
            return "not run yet"
        text = (f"{trace.status}, {trace.steps} steps, {trace.model_calls} diffusion-model calls, "
                f"{len(self.loras)} LoRAs, {trace.seconds:.2f}s")
        return text + self.details(trace) + self.schedule_details(trace)

    def schedule_details(self, trace: RunTrace) -> str:
        """The steps each LoRA with a step range or curve was on, and its strengths there."""
        parts = []
        for i, ml in enumerate(self.loras):
            if not ml.entry.scheduled:
                continue
            on = [s for s in sorted(trace.strengths) if trace.strengths[s][i] != 0.0]
            if not on:
                parts.append(f"'{ml.entry.name}' on no step of this run ({ml.entry.describe_schedule()}; "
                             "widen its range or add steps)")
                continue
            values = [trace.strengths[s][i] for s in on]
            strength = (f"strength {values[0]:g}" if len(set(values)) == 1
                        else f"strength {values[0]:.2f} -> {values[-1]:.2f}")
            parts.append(f"'{ml.entry.name}' on steps {on[0]}-{on[-1]}, {strength}")
        return "; step ranges: " + "; ".join(parts) if parts else ""

    def details(self, trace: RunTrace) -> str:
        return f", rows per call: {sorted(set(trace.call_rows))}"
