"""The pack beside the host's own nodes that artists wire around a LoRA stack: ControlNet, FreeU,
Self-Attention Guidance, IPAdapter-style attention patches, area conditioning, inpainting models."""
from __future__ import annotations

import pytest
import torch

import comfy.patcher_extension
import folder_paths
import nodes as host_nodes

from _util import ksample
from comfyui_cmlora.nodes.unet_split import capturing, find_split, shallow_forward

CONTROLNET = "cmlora_tiny_sd15_controlnet.safetensors"


def host_node(cls, **inputs):
    """Run a host node whichever API it is written in (the newer host moved many nodes to V3)."""
    if hasattr(cls, "FUNCTION"):
        return getattr(cls(), cls.FUNCTION)(**inputs)
    return cls.execute(**inputs).args


@pytest.fixture(scope="module")
def controlnet(models_dir):
    """A random-weight ControlNet file made now, loaded by the host's ControlNetLoader."""
    import make_fixtures as fx

    folder = models_dir / "controlnet"
    folder.mkdir(exist_ok=True)
    if not (folder / CONTROLNET).exists():
        fx.make_sd15_controlnet(folder / CONTROLNET)
    folder_paths.add_model_folder_path("controlnet", str(folder), is_default=True)
    return host_node(host_nodes.ControlNetLoader, control_net_name=CONTROLNET)[0]


def with_controlnet(conds, controlnet, strength=1.0):
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    pos, neg = host_node(host_nodes.ControlNetApplyAdvanced, positive=conds[0], negative=conds[1],
                         control_net=controlnet, image=hint, strength=strength, start_percent=0.0, end_percent=1.0)
    return pos, neg


def freeu(model):
    from comfy_extras.nodes_freelunch import FreeU

    return host_node(FreeU, model=model, b1=1.3, b2=1.4, s1=0.9, s2=0.2)[0]


def _copy_lists(control):
    if isinstance(control, list):
        return [_copy_lists(v) for v in control]
    if isinstance(control, dict):
        return {k: _copy_lists(v) for k, v in control.items()}
    return control


class ShallowCheck:
    """A DIFFUSION_MODEL wrapper: on every call the host makes, a full pass capturing the deep feature
    and a shallow pass around it, with the call's ControlNet residuals and patches; both kept."""

    def __init__(self):
        self.pairs, self.indices = [], []

    def __call__(self, executor, x, t, context, y, control, options, **kwargs):
        unet = executor.class_obj
        split = find_split(unet)
        sink, seen = [], {"full": [], "shallow": []}
        self._record = seen
        full = executor(x, t, context, y, _copy_lists(control), capturing(dict(options), split, sink), **kwargs)
        self._pass = "shallow"
        shallow = shallow_forward(unet, split, x, t, context, y, sink[0], dict(options), _copy_lists(control))
        self._pass = "full"
        self.pairs.append((full, shallow))
        self.indices.append(seen)
        self._record = None
        return executor(x, t, context, y, control, options, **kwargs)

    _pass = "full"

    def attn1(self, n, context, value, extra_options):
        """An attn1 patch recording which transformer index every output-block layer sees."""
        block = extra_options.get("block")
        if block is not None and block[0] == "output" and getattr(self, "_record", None) is not None:
            self._record[self._pass].append((block[1], extra_options["transformer_index"]))
        return n, context, value

    def attach(self, model):
        m = model.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test-shallow-check", self)
        m.set_model_attn1_patch(self.attn1)
        return m


@pytest.mark.parametrize("with_cn,with_freeu", [(True, False), (False, True), (True, True)])
def test_shallow_pass_with_fresh_deep_feature_equals_full_pass_beside_controlnet_and_freeu(
        sd15, conds, controlnet, with_cn, with_freeu):
    model = freeu(sd15[0]) if with_freeu else sd15[0]
    cond = with_controlnet(conds, controlnet) if with_cn else conds
    check = ShallowCheck()
    ksample(check.attach(model), cond, steps=2)
    assert check.pairs
    for full, shallow in check.pairs:
        assert torch.equal(full, shallow), (full - shallow).abs().max()
    # the residuals and FreeU really act on the outer blocks: dropping them changes the output
    full, _ = check.pairs[0]
    plain = ShallowCheck()
    ksample(plain.attach(sd15[0]), conds, steps=2)
    assert not torch.allclose(full, plain.pairs[0][0], atol=1e-3)


def test_shallow_pass_keeps_the_transformer_index_of_the_full_pass(sd15, conds):
    """Patches keyed by transformer index (GLIGEN's) see the same index in both passes."""
    check = ShallowCheck()
    ksample(check.attach(sd15[0]), conds, steps=1)
    for seen in check.indices:
        split = find_split(sd15[0].model.diffusion_model)
        expected = [(b, i) for b, i in seen["full"] if b >= split.out_start]
        assert expected and seen["shallow"] == expected
