"""CMLoRA Compare Methods: one seed sampled with several composing methods, side by side.

Every method runs the path CMLoRA Sampler runs (``patched_model`` builds a patched clone,
the host's KSampler samples it), then the node decodes each result with the VAE and lays the
images out in one grid, one column per method in the order listed, with a label under each:
the method, the wall seconds of its sampling, and its diffusion-model FLOPs relative to
merge. All patched models are built before the first run, so a bad stack or schedule fails
before any sampling; the input model itself is never changed (every method samples a clone).

FLOPs relative to merge are read from what each run did, per model call of the sampler: a
pass counter sits outside the method on the model (the rows the sampler asked for), the
method's runtime trace gives the rows its forwards ran (composite: one copy per LoRA), and
CMLoRA's own ratio counts its shallow passes at their measured share of a full pass (the
figure its report prints). Merge and the base model run one pass per call: 1.00x. The LoRA
deltas a method adds in the forward (routed: composite, CMLoRA, regions, merge and switch with
step ranges) add the FLOPs of their matrix products, tallied by the routed layers as they run
and set against a full pass of the model counted on the meta device for the run's input shapes.
LoRAs folded into the weights cost nothing per call (the folding itself is not counted).

Seconds are the sampler's loop alone (a SAMPLER_SAMPLE wrapper's clock): loading the model and
patching it in, which the first column would pay for the others, and decoding are left out, so
a column's label does not depend on its place in the list.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..cmlora_core.cmlora import ScheduleMismatch, check_schedule
from ..cmlora_core.errors import CMLoRAError
from ..cmlora_core.stack import require_model_entries
from . import host
from .apply_nodes import Schedule, patched_model
from .checks import check_inputs
from .cmlora_runtime import CMLoRARuntime
from .host import io
from .methods import METHODS
from .routed import ModelCall
from .runtime import new_key, runtime_of
from .stack_nodes import Stack

BASE = "base"  # the model without the stack's LoRAs, for reference
CHOICES = (BASE, *METHODS)
DEFAULT_METHODS = "merge, switch, composite, cmlora"


def parse_methods(text: str, node: str) -> list[str]:
    """The method names of ``text`` (separated by commas or spaces), in order; every name known and listed once."""
    names = [n.strip().lower() for n in text.replace(",", " ").split()]
    if not names:
        raise CMLoRAError(node, "methods", "lists no method.",
                          f"type one or more of {', '.join(CHOICES)}, separated by commas (e.g. '{DEFAULT_METHODS}').")
    unknown = [n for n in names if n not in CHOICES]
    if unknown:
        shown_names = ", ".join(repr(n[:40]) for n in unknown[:5])
        raise CMLoRAError(node, "methods", f"unknown method {shown_names}.",
                          f"use only {', '.join(CHOICES)}, separated by commas.")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise CMLoRAError(node, "methods", f"lists {', '.join(twice)} more than once (the same seed gives the "
                          "same image).", "list each method once.")
    return names


class RowCounter:
    """A DIFFUSION_MODEL wrapper outside the method's own: the model calls and rows the sampler asks for,
    and the first call as one row on the meta device (its shapes, for counting a full pass)."""

    def __init__(self):
        self.calls = self.rows = 0
        self.meta_call: tuple[str, ModelCall] | None = None

    def __call__(self, executor, *args, **kwargs):
        call = ModelCall.of(executor, args, kwargs)
        self.calls += 1
        self.rows += call.rows
        if self.meta_call is None:
            self.meta_call = (executor.original.__name__, meta_row(call))
        return call.run(executor)


def meta_row(call: ModelCall) -> ModelCall:
    """The call with one row of each per-row tensor, every tensor on the meta device (shapes only), no
    transformer options (no patches) and no ControlNet residuals."""
    rows = call.rows

    def meta(value):
        if torch.is_tensor(value):
            shape = (1, *value.shape[1:]) if value.ndim and value.shape[0] == rows else tuple(value.shape)
            return torch.empty(shape, device="meta", dtype=value.dtype)
        if isinstance(value, (list, tuple)):
            return type(value)(meta(v) for v in value)
        return value

    values = {k: ({} if k == "transformer_options" else None if k == "control" else meta(v))
              for k, v in call.values.items()}
    return ModelCall(values, call.positional)


PASS_FLOPS: dict = {}  # (model class, config, forward, input shapes) -> FLOPs of one full pass of one row


def _shapes(value):
    if torch.is_tensor(value):
        return (tuple(value.shape), str(value.dtype))
    if isinstance(value, (list, tuple)):
        return tuple(_shapes(v) for v in value)
    return repr(value)


def pass_flops(base_model, meta_call: tuple[str, ModelCall]) -> int:
    """FLOPs of one full pass of the diffusion model on the recorded call's row (``RowCounter.meta_call``),
    counted on the meta device (the model rebuilt without weights by its own class) with the counter
    the CMLoRA report uses; once per process for each architecture and input shape."""
    from ..cmlora_core.flops import FlopCounter

    forward, call = meta_call
    config = base_model.model_config.unet_config
    key = (type(base_model.diffusion_model).__name__, repr(sorted(config.items(), key=lambda kv: kv[0])), forward,
           tuple((k, _shapes(v)) for k, v in sorted(call.values.items())))
    if key not in PASS_FLOPS:
        model = host.meta_diffusion_model(base_model)
        with torch.inference_mode(), host.meta_attention(), FlopCounter() as counter:
            call.run(getattr(model, forward))
        PASS_FLOPS[key] = counter.total
    return PASS_FLOPS[key]


class SamplingClock:
    """A SAMPLER_SAMPLE wrapper: the seconds of the sampler's loop (the model already loaded and patched)."""

    def __init__(self):
        self.seconds = 0.0

    def __call__(self, executor, *args, **kwargs):
        started = time.perf_counter()
        try:
            return executor(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started


def count_products(patched) -> None:
    """Have the routed layers of ``patched`` (if it has any) tally their products in the next run."""
    runtime = runtime_of(patched)
    if runtime is not None:
        runtime.routed.products = [0]


def flop_ratio(patched, counter: RowCounter) -> float:
    """Diffusion-model FLOPs of the run just sampled with ``patched``, over merge's (one pass of every row the
    sampler asked for), from the run's own record: its passes, and the products of its routed deltas."""
    if counter.rows == 0:
        raise RuntimeError("the sampler made no model call")  # not reachable through KSampler (steps >= 1)
    runtime = runtime_of(patched)
    if runtime is None:  # base, or merge without step ranges: one pass per call, the LoRAs in the weights
        return 1.0
    trace = runtime.last_trace
    if isinstance(runtime, CMLoRARuntime):  # shallow passes count at their share of a full pass
        passes = runtime.flop_ratio(trace)
    else:
        passes = sum(trace.call_rows) / counter.rows
    products = runtime.routed.products[0] if runtime.routed.products else 0
    if products:
        passes += products / (counter.rows * pass_flops(patched.model, counter.meta_call))
    return passes


# ---------------------------------------------------------------- the grid

BACKGROUND = (28, 28, 28)
TEXT = ((240, 240, 240), (200, 200, 200), (200, 200, 200))  # name, seconds, FLOPs
PAD = 0.35  # of the font size, around the label text
LINE = 1.25  # line height, of the font size


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1 has one bitmap size
        return ImageFont.load_default()


def font_size(columns: int, tile_w: int) -> int:
    """Large enough to read once the frontend fits the whole grid into the node (about 400 pixels wide)
    and at least 12 pixels in the image itself."""
    return max(12, round(tile_w * max(1 / 10, columns / 40)))


def label_lines(method: str, seconds: float, ratio: float) -> list[str]:
    secs = f"{seconds:.2f} s" if seconds < 100 else f"{seconds:.0f} s"
    flops = f"{ratio:.2f}x FLOPs" if ratio < 100 else f"{ratio:.0f}x FLOPs"
    return [method, secs, flops]


@dataclass(frozen=True)
class GridLayout:
    """Where the tiles and labels go; depends only on the methods and the image size (not on the measured values)."""

    columns: int
    rows: int  # images per method (the latent's batch)
    tile_h: int
    tile_w: int
    font: int
    col_w: int
    gap: int
    label_h: int

    @property
    def width(self) -> int:
        return self.columns * self.col_w + (self.columns + 1) * self.gap

    @property
    def height(self) -> int:
        return self.gap + self.rows * (self.tile_h + self.gap) + self.label_h

    def column_x(self, col: int) -> int:
        return self.gap + col * (self.col_w + self.gap)

    def tile_box(self, col: int, row: int = 0) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of a method's image ``row``."""
        x = self.column_x(col) + (self.col_w - self.tile_w) // 2
        y = self.gap + row * (self.tile_h + self.gap)
        return x, y, x + self.tile_w, y + self.tile_h

    def label_box(self, col: int) -> tuple[int, int, int, int]:
        y = self.gap + self.rows * (self.tile_h + self.gap)
        return self.column_x(col), y, self.column_x(col) + self.col_w, y + self.label_h


def grid_layout(methods: list[str], rows: int, tile_h: int, tile_w: int) -> GridLayout:
    size = font_size(len(methods), tile_w)
    font = _font(size)
    widest = max(font.getlength(t) for t in [*methods, label_lines("", 0.0, 10.0)[2], label_lines("", 99.99, 1.0)[1]])
    pad = math.ceil(PAD * size)
    col_w = max(tile_w, math.ceil(widest * 1.1) + 2 * pad)  # 10% slack: digits differ in width
    label_h = math.ceil(3 * LINE * size) + 2 * pad
    return GridLayout(len(methods), rows, tile_h, tile_w, size, col_w, max(2, tile_w // 32), label_h)


def draw_grid(layout: GridLayout, images: list[torch.Tensor], labels: list[list[str]]) -> torch.Tensor:
    """One IMAGE (1, H, W, 3): each method's images (B, h, w, 3) in its column, unchanged, its label below."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font(layout.font)
    pad = math.ceil(PAD * layout.font)
    for col, lines in enumerate(labels):
        x0, y0, _, _ = layout.label_box(col)
        for i, (text, colour) in enumerate(zip(lines, TEXT)):
            draw.text((x0 + pad, y0 + pad + round(i * LINE * layout.font)), text, fill=colour, font=font)
    grid = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)
    for col, batch in enumerate(images):
        for row in range(layout.rows):
            x0, y0, x1, y1 = layout.tile_box(col, row)
            grid[y0:y1, x0:x1] = batch[row].detach().to(device="cpu", dtype=torch.float32)[..., :3]
    return grid[None]


def decode(vae, latent: dict) -> torch.Tensor:
    """What VAE Decode gives for ``latent`` (batches of video latents joined)."""
    images = vae.decode(latent["samples"])
    if images.ndim == 5:
        images = images.reshape(-1, *images.shape[-3:])
    return images


# ---------------------------------------------------------------- the node

class CompareMethodsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return host.schema(
            node_id="CMLoRA_CompareMethods",
            search_aliases=['compare lora methods', 'lora method grid', 'multi lora compare', 'cmlora compare'],
            display_name="CMLoRA Compare Methods",
            category="sampling/cmlora",
            description="Samples the same seed once per composing method and returns one grid image, a column per "
                        "method, labelled with its sampling time and its diffusion-model FLOPs relative to merge.",
            inputs=[
                io.Model.Input("model", tooltip="The base model (after any LoraLoader you want under every LoRA)."),
                Stack.Input("stack", tooltip="The LoRAs to compose, from 'CMLoRA LoRA Stack' nodes."),
                io.Conditioning.Input("positive", tooltip="What the image should show (encode with the CLIP from "
                                                          "'CMLoRA Apply CLIP')."),
                io.Conditioning.Input("negative", tooltip="What the image should not show."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise, e.g. from Empty Latent Image."),
                io.Vae.Input("vae", tooltip="Decodes each method's result for the grid."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The random seed, the same for every method."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="The number of denoising steps."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale; 1 skips the negative prompt."),
                io.Combo.Input("sampler_name", options=host.SAMPLER_NAMES, tooltip="The sampling algorithm."),
                io.Combo.Input("scheduler", options=host.SCHEDULER_NAMES, tooltip="How the noise levels are spaced."),
                io.String.Input("methods", default=DEFAULT_METHODS, multiline=False,
                                tooltip="The methods to compare, in grid order, separated by commas: merge, switch, "
                                        "composite, cmlora (needs a schedule), regions (LoRAs with masks), and "
                                        "base (no LoRA) for reference."),
                io.Int.Input("switch_interval", default=5, min=1, max=1000,
                             tooltip="Switch: steps each LoRA stays active before the next one takes over.",
                             **host.ADVANCED),
                Schedule.Input("schedule", optional=True,
                               tooltip="A CMLoRA frequency schedule; needed when methods lists cmlora."),
            ],
            outputs=[
                io.Image.Output(display_name="grid", tooltip="One image: a column per method, labelled."),
                io.String.Output(display_name="report", tooltip="Per method: time, FLOPs relative to merge and "
                                                                "what the run did."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, stack, positive, negative, latent_image, vae, seed, steps, cfg, sampler_name, scheduler,
                methods, switch_interval, schedule=None):
        node = check_inputs(cls, locals())
        names = parse_methods(methods, node)
        if "cmlora" in names and schedule is None:
            raise CMLoRAError(node, "schedule", "methods lists cmlora, which needs a schedule, and none is connected.",
                              "connect a 'CMLoRA Frequency Scheduler' (its stack input is enough) to schedule, or "
                              "remove cmlora from methods.")
        entries = require_model_entries(stack, node)
        masked = [e.name for e in entries if e.mask is not None]
        unmasking = [n for n in names if n not in (BASE, "regions")]
        if masked and unmasking:
            raise CMLoRAError(node, "methods", f"LoRA {', '.join(repr(n) for n in masked)} has a mask, which only "
                              f"method regions honours, and methods also lists {', '.join(unmasking)}.",
                              "list only regions (and base) for this stack, or disconnect the mask from its stack "
                              "node to compare the other methods.")
        if "cmlora" in names:  # the run's step count too, so that cmlora cannot fail after the other methods ran
            try:
                check_schedule(schedule, [e.name for e in entries], steps)
            except ScheduleMismatch as e:
                raise CMLoRAError(node, e.input, e.problem, e.fix) from None
        # every patched model first: a bad stack or schedule stops the node before any sampling
        runs = []
        for name in names:
            counter, clock = RowCounter(), SamplingClock()
            counted = model.clone()
            counted.add_wrapper_with_key(host.WrappersMP.DIFFUSION_MODEL, new_key("compare"), counter)
            counted.add_wrapper_with_key(host.WrappersMP.SAMPLER_SAMPLE, new_key("compare-clock"), clock)
            if name != BASE:
                counted, _ = patched_model(counted, stack, name, switch_interval,
                                           schedule if name == "cmlora" else None, node)
            runs.append((name, counted, counter, clock))

        images, labels = [], []
        lines = [f"{node}: seed {seed}, {steps} steps, cfg {cfg}, {sampler_name}/{scheduler}, {len(entries)} LoRAs: "
                 + ", ".join(e.name for e in entries)]
        for name, patched, counter, clock in runs:
            count_products(patched)
            latent = host.ksampler(patched, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                   latent_image)
            decoded = decode(vae, latent)
            seconds = clock.seconds
            ratio = flop_ratio(patched, counter)
            images.append(decoded)
            labels.append(label_lines(name, seconds, ratio))
            runtime = runtime_of(patched)
            detail = runtime.report(runtime.last_trace) if runtime is not None else (
                "no LoRA" if name == BASE else "LoRAs folded into the weights by the host")
            lines.append(f"{name}: {seconds:.2f} s (sampling), {ratio:.3f}x the model FLOPs of merge, "
                         f"{counter.calls} model calls; {detail}")
        if schedule is not None and "cmlora" not in names:
            lines.append("note: a schedule is connected but methods does not list cmlora, so it was not used.")
        lines.append("FLOPs relative to merge: diffusion-model passes per model call of the sampler (merge and base: one); "
                     "CMLoRA's shallow passes count at their share of a full pass; LoRA deltas added in the forward "
                     "count their matrix products; LoRAs folded into the weights cost nothing per call.")

        first = images[0]
        layout = grid_layout(names, first.shape[0], first.shape[1], first.shape[2])
        grid = draw_grid(layout, images, labels)
        report = "\n".join(lines)
        ui = {**host.ui.PreviewImage(grid, cls=cls).as_dict(), **host.ui.PreviewText(report).as_dict()}
        return io.NodeOutput(grid, report, ui=ui)
