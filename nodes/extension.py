"""The pack's V3 extension: the list of its nodes."""
from __future__ import annotations

from .apply_nodes import ApplyNode, SamplerNode
from .clora_nodes import AttentionMasker, LoadMasks, MaskOutput, SaveMasks
from .compare_nodes import CompareMethodsNode
from .cmlora_nodes import LoadProfile, ProfilerNode, SaveProfile, SchedulerNode
from .host import ComfyExtension, io
from .stack_nodes import ApplyClip, LoraStackNode, StackFromLoraStack


class CMLoRAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoraStackNode, StackFromLoraStack, ApplyClip, ApplyNode, SamplerNode,
                ProfilerNode, SchedulerNode, SaveProfile, LoadProfile, AttentionMasker, MaskOutput, SaveMasks, LoadMasks,
                CompareMethodsNode]
