"""FLOPs per image of every method, counted on the meta device through the host's sampler.

The full-size UNet is built by the host's model class on the meta device (shapes, no
weights), the LoRAs are meta tensors mapped by the host's own LoRA loader, and each case
runs ``comfy.sample.sample`` with the model the nodes build. Two wrappers, added to the base
model before the nodes clone it (so they sit outside the pack's own), make that possible:

* ``prepare_sampling``: in place of the host's memory manager (which would copy weights
  to the CPU), apply the clone's weight patches where the weights are — merge's folding
  still runs, on meta tensors;
* ``diffusion_model``: hand the model meta copies of its inputs and give the sampler a
  zero prediction of the right shape back, so the sampler's own arithmetic (sigmas, CFG,
  Euler) runs on real CPU tensors and every step and every decision of the pack's runtime
  happens as in a real run.

Everything inside the sampling call is counted: UNet passes, routed LoRA deltas, switch's
refolds, merge's folding, CLoRA's loss passes and their backward. Data-dependent decisions
see zeros: online CMLoRA observes the noisy latent and does not switch phase.
"""
from __future__ import annotations

import time

from .harness import Case, build_model, import_host, mapped_loras, patched_model, runtime_of, sample

RANK = 32


def meta_wrappers(model_patcher, calls: list) -> None:
    """The two wrappers (see the module docstring); ``calls`` receives the rows of each model call."""
    import comfy.patcher_extension as ext
    import torch

    def prepare(executor, model, noise_shape, conds, *args, **kwargs):  # newer hosts pass more options
        # patch the weights where they are (meta) and move nothing: newer hosts' load() moves
        # the modules to the CPU when given no device, older ones left them in place
        model.patch_model(device_to=None, load_weights=False)
        for key in model.patches:
            model.patch_weight_to_device(key, device_to=None)
        return model.model, conds, []

    def to_meta(v):
        return v.to("meta") if isinstance(v, torch.Tensor) else v

    def bridge(executor, x, *args, **kwargs):  # every model's arguments: tensors to meta, the rest as is
        calls.append(x.shape[0])
        out = executor(to_meta(x), *map(to_meta, args), **{k: to_meta(v) for k, v in kwargs.items()})
        return torch.zeros(out.shape, dtype=out.dtype)

    model_patcher.add_wrapper_with_key(ext.WrappersMP.PREPARE_SAMPLING, "benchmark", prepare)
    model_patcher.add_wrapper_with_key(ext.WrappersMP.DIFFUSION_MODEL, "benchmark", bridge)


class MetaBench:
    """One architecture on the meta device, its LoRAs, and counted runs of cases."""

    def __init__(self, arch_key: str, steps: int, max_n: int = 5):
        import torch

        import_host()
        self.arch_key, self.steps = arch_key, steps
        with torch.inference_mode():  # as the host's executor loads models and LoRAs
            self.model = build_model(arch_key, "meta", torch.float16)
            self.loras = mapped_loras(self.model, max_n, RANK, "meta", torch.float16)
        self.calls: list[int] = []
        meta_wrappers(self.model, self.calls)

    def run(self, case: Case) -> dict:
        from comfyui_cmlora.cmlora_core.flops import FlopCounter
        from comfyui_cmlora.nodes.host import meta_attention

        model, pos, neg = patched_model(case, self.model, self.loras, self.arch_key)
        started = time.perf_counter()
        self.calls.clear()
        try:
            with meta_attention(), FlopCounter() as counter:
                sample(model, pos, neg, self.arch_key, self.steps)
        finally:
            model.unpatch_model()
        return {"case": case, "flops": counter.total, "trace": trace_summary(model, self.calls),
                "seconds": time.perf_counter() - started}

    def pass_costs(self) -> dict:
        """FLOPs of one call's passes: the plain model and with one LoRA routed (full passes), and on
        a UNet the same for CMLoRA's shallow pass."""
        import torch
        from comfyui_cmlora.nodes.routed import RoutedLoras
        from comfyui_cmlora.nodes.unet_split import count_passes, find_split

        from .harness import ARCHS, unet_config

        unet = self.model.model.diffusion_model
        arch = ARCHS[self.arch_key]
        side, rows = arch.size // 8, arch.rows  # one call: the CFG pair, or one row without CFG
        x = torch.empty(rows, arch.latent_channels, side, side, device="meta", dtype=torch.float16)
        t = torch.empty(rows, device="meta")
        ctx = torch.empty(rows, arch.tokens, arch.context_dim, device="meta", dtype=torch.float16)
        if not arch.unet:
            return self._dit_costs(unet, arch, x, t, ctx)
        adm = unet_config(self.arch_key).get("adm_in_channels")
        y = None if adm is None else torch.empty(rows, adm, device="meta", dtype=torch.float16)
        split = find_split(unet)
        lora = RoutedLoras(self.loras[:1], "benchmark")
        costs = {}
        lora.install(self.model.model)
        try:
            costs["full_unet"], costs["shallow_unet"] = count_passes(unet, split, x, t, ctx, y)
            with lora.routed(lora.blocks(rows, [0])):
                costs["full_lora"], costs["shallow_lora"] = count_passes(unet, split, x, t, ctx, y)
        finally:
            lora.remove()
        return costs

    def _dit_costs(self, dit, arch, x, t, ctx) -> dict:
        import torch
        from comfyui_cmlora.cmlora_core.flops import FlopCounter
        from comfyui_cmlora.nodes.host import meta_attention
        from comfyui_cmlora.nodes.routed import RoutedLoras

        y = torch.empty(x.shape[0], arch.pooled_dim, device="meta", dtype=torch.float16)
        guidance = torch.empty(x.shape[0], device="meta")

        def count() -> float:
            with torch.inference_mode(), meta_attention(), FlopCounter() as counter:
                dit(x, t, ctx, y=y, guidance=guidance, transformer_options={})
            return counter.total

        lora = RoutedLoras(self.loras[:1], "benchmark")
        costs = {"full_unet": count()}
        lora.install(self.model.model)
        try:
            with lora.routed(lora.blocks(x.shape[0], [0])):
                costs["full_lora"] = count()
        finally:
            lora.remove()
        return costs


def trace_summary(model, calls: list) -> dict:
    """What the run did: host-side model calls (seen by the bridge) and the runtime's own trace."""
    out = {"model_calls": len(calls), "host_rows": sorted(set(calls))}
    runtime = runtime_of(model)
    if runtime is None:  # merge: the host folds the LoRAs, no runtime
        return out
    trace = runtime.last_trace
    out.update({"runtime_calls": trace.model_calls, "call_rows": list(trace.call_rows), "status": trace.status})
    if runtime.method == "switch":
        out.update({"folds": trace.folds, "active": [trace.active[s] for s in sorted(trace.active)]})
    if runtime.method == "cmlora":
        out.update({"full": trace.full_passes, "shallow": trace.shallow_passes, "reused": trace.reused,
                    "switched_at": trace.switched_at})
    clora = getattr(runtime, "last_clora", None)
    if clora is not None:
        out["loss_passes"] = sum(len(v) for v in clora.losses.values())
    return out


# ---------------------------------------------------------------- what the schedules say

def expected_passes(case: Case, steps: int, calls_per_step: int, switched_at: int | None = None,
                    rows: int = 2) -> dict:
    """What each method's schedule prescribes for a run, computed from the schedules alone.

    calls_per_step: diffusion-model calls the host makes per step (1 when cond and uncond are
    batched); switched_at: the online phase change the run reported (it depends on the data);
    rows: rows of one host call (2: the CFG pair; 1 without CFG).
    """
    from comfyui_cmlora.cmlora_core.clora import update_plan
    from comfyui_cmlora.cmlora_core.cmlora import FULL, SHALLOW, Planner
    from comfyui_cmlora.cmlora_core.steps import switch_active

    from .harness import cmlora_schedule

    calls = steps * calls_per_step
    out = {"model_calls": calls}
    if case.method == "merge":
        out["rows_per_call"] = rows
    elif case.method == "switch":
        active = [switch_active(s, 5, case.n) for s in range(steps)]
        out["active"] = active
        out["folds"] = 1 + sum(1 for s in range(1, steps) if active[s] != active[s - 1])
    elif case.method in ("composite", "composite-seq"):
        out["lora_rows"] = rows * case.n * calls  # every LoRA evaluated on every row of every call
    elif case.method == "clora":
        out["rows_per_call"] = 2 * (case.n + 1)  # base prompt + one branch per subject, cond and uncond
        out["loss_passes"] = sum(update_plan(steps, extra_iterations=case.extra_iterations).values()) \
            if case.n >= 2 and case.updates else 0
    else:
        planner = Planner(cmlora_schedule(case), steps)
        full = shallow = 0
        for s in range(steps):
            if switched_at is not None and s == switched_at:
                planner.observe(s - 1, 0.0)
            plan = planner.plan(s)
            full += plan.passes.count(FULL)
            shallow += plan.passes.count(SHALLOW)
        out.update({"full": full * calls_per_step, "shallow": shallow * calls_per_step,
                    "reused": (case.n * steps - full - shallow) * calls_per_step})
    return out


def observed_passes(trace: dict) -> dict:
    """The same quantities as ``expected_passes``, read from a run's trace."""
    rows = set(trace.get("call_rows") or trace["host_rows"])
    seen = {k: trace[k] for k in ("model_calls", "active", "folds", "full", "shallow", "reused", "loss_passes")
            if k in trace}
    seen["rows_per_call"] = rows.pop() if len(rows) == 1 else sorted(rows)
    seen["lora_rows"] = sum(trace.get("call_rows", []))
    return seen


def check_passes(case: Case, trace: dict, steps: int, rows: int = 2) -> list[str]:
    """Differences between a run and its schedule ([] when they agree)."""
    calls_per_step = trace["model_calls"] // steps
    if calls_per_step * steps != trace["model_calls"]:
        return [f"model_calls: {trace['model_calls']} is not a multiple of {steps} steps"]
    expected = expected_passes(case, steps, calls_per_step, trace.get("switched_at"), rows)
    seen = observed_passes(trace)
    return [f"{k}: schedule {v}, run {seen.get(k, 'none')}" for k, v in expected.items() if seen.get(k) != v]


def cmlora_bound(case: Case, trace: dict, costs: dict, steps: int) -> float:
    """The structural bound from the schedule: full passes x a full pass + shallow passes x a shallow pass.

    Pass costs are of one call (the CFG pair) with one LoRA routed, counted on the same
    architecture; reused predictions cost nothing.
    """
    expected = expected_passes(case, steps, trace["model_calls"] // steps, trace.get("switched_at"))
    return expected["full"] * costs["full_lora"] + expected["shallow"] * costs["shallow_lora"]



_BENCHES: dict = {}


def flop_task(arch: str, case: Case | None, steps: int):
    """Worker-process side of the FLOP table: one counted run, or (case None) the pass costs.
    ``steps`` unless the architecture has its own (Flux dev: 28)."""
    from .harness import ARCHS

    bench = _BENCHES.get(arch)
    if bench is None:
        bench = _BENCHES[arch] = MetaBench(arch, ARCHS[arch].steps or steps)
        if ARCHS[arch].unet:
            bench.run(Case("cmlora", 2))  # uncounted: the runtime's one-time FLOP probe of this shape
    if case is None:
        return arch, None, bench.pass_costs()
    result = bench.run(case)
    return arch, case, {"flops": result["flops"], "trace": result["trace"], "seconds": result["seconds"]}
