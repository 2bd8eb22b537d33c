"""Composite the way the reference code runs it: one forward per LoRA, then the average.

Only the batching differs from the pack's composite (same routed LoRA layers, same
weights, same average), so timing the two side by side isolates what batching the N LoRA
copies into one forward buys. Used by the benchmark only.
"""
from __future__ import annotations

import torch


def apply_sequential_composite(model, loras):
    from comfyui_cmlora.nodes.runtime import MultiLoraRuntime

    class SequentialComposite(MultiLoraRuntime):
        def _forward_copies(self, executor, trace, indices, *args, capture=None):
            outs = [super(SequentialComposite, self)._forward_copies(executor, trace, [i], *args) for i in indices]
            return torch.cat(outs)

    clone = model.clone()
    SequentialComposite("composite", loras).attach(clone)
    return clone
