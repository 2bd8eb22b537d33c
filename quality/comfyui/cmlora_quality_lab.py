"""The quality lab's nodes for a ComfyUI server: the lab model's loader and its image space.

Not part of the pack: the lab's scripts (``scripts/quality.sh``, the demo) start a ComfyUI server whose
extra model paths list this folder under ``custom_nodes`` and the lab's model files under ``lab_models``
and ``loras``; a user's own server evaluates the lab the same way once given that configuration.

- **Lab Model Loader** loads ``lab_base.safetensors``: the host's own SD1.5 model class at the lab's
  width, which the checkpoint loader cannot detect from the file. It gives the model, the lab's
  "VAE" (the world's exactly invertible image <-> model space map: 64x64 RGB <-> 48 channels at
  16x16) and an empty latent of that space.
- **Lab Zone Mask** is a composition's intended layout as a mask: where the world puts the figure
  (its character and clothing) or the object, for the pack's method ``regions``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:  # the lab's modules, beside this folder in the pack's repository
    sys.path.append(str(_REPO))  # last: the repository's nodes/ must never shadow the host's nodes module

import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import folder_paths  # noqa: E402

from quality import lab, world  # noqa: E402

FOLDER = "lab_models"
if FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths[FOLDER] = ([], {".safetensors"})


class LabVAE(comfy.sd.VAE):
    """The world's image <-> model-space map as a host VAE (nodes check the type): no network, no weights,
    the host's VAE constructor not run; only the methods the host's VAE nodes and the pack call."""

    latent_channels = 48
    downscale_ratio = upscale_ratio = 4

    def __init__(self):  # noqa: D107  (the host's constructor would build a network from a state dict)
        pass

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        return world.from_latent(samples.float().cpu()).movedim(1, -1)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return world.to_latent(pixels[..., :3].movedim(-1, 1).float().cpu())

    def spacial_compression_decode(self) -> int:
        return self.upscale_ratio

    def spacial_compression_encode(self) -> int:
        return self.downscale_ratio


class LabModelLoader:
    DESCRIPTION = "The quality lab's base model, its image space as a VAE, and an empty latent of its 64x64 images."
    CATEGORY = "quality lab"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "VAE", "LATENT")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (folder_paths.get_filename_list(FOLDER), {"tooltip": "A lab_base.safetensors the lab trained."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 256,
                                   "tooltip": "Images per run; image i is the i-th noise of the run's seed."}),
        }}

    def load(self, model_name, batch_size):
        path = folder_paths.get_full_path_or_raise(FOLDER, model_name)
        model = lab.load_base(Path(path))
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                                   offload_device=comfy.model_management.unet_offload_device())
        latent = torch.zeros(batch_size, LabVAE.latent_channels, world.SIZE // 4, world.SIZE // 4)
        return patcher, LabVAE(), {"samples": latent}


class LabZoneMask:
    DESCRIPTION = "Where the world's layout puts the figure or the object, as a 64x64 mask (columns of the image)."
    CATEGORY = "quality lab"
    FUNCTION = "mask"
    RETURN_TYPES = ("MASK",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"zone": (["figure", "object"],)}}

    def mask(self, zone):
        left, right = world.FIGURE_ZONE if zone == "figure" else world.OBJECT_ZONE
        out = torch.zeros(1, world.SIZE, world.SIZE)
        out[:, :, left:right] = 1.0
        return (out,)


NODE_CLASS_MAPPINGS = {"CMLoRALab_ModelLoader": LabModelLoader, "CMLoRALab_ZoneMask": LabZoneMask}
NODE_DISPLAY_NAME_MAPPINGS = {"CMLoRALab_ModelLoader": "Lab Model Loader", "CMLoRALab_ZoneMask": "Lab Zone Mask"}
