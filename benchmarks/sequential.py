"""Composite the way the reference code runs it: one forward per LoRA, then the average.

Only the batching differs from the pack's composite (same routed LoRA layers, same
weights, same average), so timing the two side by side isolates what batching the N LoRA
copies into one forward buys. Used by the benchmark only.
"""
from __future__ import annotations

import torch


def apply_sequential_composite(model, loras):
    from comfyui_cmlora.nodes.methods import CompositeRuntime

    class SequentialComposite(CompositeRuntime):
        def evaluate(self, executor, call, indices):
            return torch.cat([super(SequentialComposite, self).evaluate(executor, call, [i]) for i in indices])

    clone = model.clone()
    SequentialComposite(loras, "benchmark").attach(clone)
    return clone
