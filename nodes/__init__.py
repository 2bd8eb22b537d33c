"""V3 node glue of the CMLoRA pack. ``host.py`` is the only module that imports ComfyUI."""
