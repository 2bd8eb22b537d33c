"""Host-free core of the CMLoRA pack: stack model, schedules and routed LoRA deltas.

Nothing here imports ComfyUI; the node glue in ``nodes/`` adapts these pieces to the host.
"""
