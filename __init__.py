"""CMLoRA: multi-LoRA composition (Merge, Switch, Composite, CMLoRA, CLoRA) for ComfyUI."""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    # Imported here so that the package (and cmlora_core) imports without a host.
    from .nodes.extension import CMLoRAExtension

    return CMLoRAExtension()
