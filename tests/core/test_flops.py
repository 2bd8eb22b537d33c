"""The benchmark's FLOP counter against hand counts and against PyTorch's own FlopCounterMode."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from cmlora_core.flops import FlopCounter, attention_flops, linear_flops
from cmlora_core.routing import DenseDelta, LowRankDelta, Route, RoutedLayer, Routing


class Block(torch.nn.Module):
    """A small layer stack with every operator kind a UNet uses: conv, norm, linear, attention."""

    def __init__(self, c=16, ctx=24, heads=2):
        super().__init__()
        self.heads = heads
        self.conv = torch.nn.Conv2d(4, c, 3, padding=1)
        self.norm = torch.nn.GroupNorm(4, c)
        self.ln = torch.nn.LayerNorm(c)
        self.q = torch.nn.Linear(c, c, bias=False)
        self.k = torch.nn.Linear(ctx, c, bias=False)
        self.v = torch.nn.Linear(ctx, c, bias=False)
        self.out = torch.nn.Linear(c, c)
        self.conv_out = torch.nn.Conv2d(c, 4, 1)

    def forward(self, x, context):
        h = F.silu(self.norm(self.conv(x)))
        b, c, hh, ww = h.shape
        t = self.ln(h.flatten(2).transpose(1, 2))  # (b, hw, c)
        q = self.q(t).view(b, -1, self.heads, c // self.heads).transpose(1, 2)
        k = self.k(context).view(b, -1, self.heads, c // self.heads).transpose(1, 2)
        v = self.v(context).view(b, -1, self.heads, c // self.heads).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)
        t = t + self.out(a)
        return self.conv_out(t.transpose(1, 2).reshape(b, c, hh, ww)) + x


def hand_count(b=2, c=16, ctx=24, length=7, hw=(8, 8), heads=2) -> int:
    """Two FLOPs per multiply-add, for every matrix product and convolution of Block."""
    pixels = hw[0] * hw[1]
    conv = 2 * b * c * pixels * 4 * 3 * 3
    q = 2 * b * pixels * c * c
    kv = 2 * (2 * b * length * ctx * c)
    attn = 2 * b * heads * pixels * length * (c // heads) * 2  # q k^T and (probabilities) v
    out = 2 * b * pixels * c * c
    conv_out = 2 * b * 4 * pixels * c
    return conv + q + kv + attn + out + conv_out


def _inputs(device, b=2, ctx=24, length=7):
    return torch.randn(b, 4, 8, 8, device=device), torch.randn(b, length, ctx, device=device)


@pytest.mark.parametrize("mode", ["inference", "grad_off"])
def test_counter_matches_a_hand_count_on_the_meta_device(mode):
    block = Block().to("meta")
    x, ctx = _inputs("meta")
    context = torch.inference_mode() if mode == "inference" else torch.no_grad()
    with context, FlopCounter() as fc:
        y = block(x, ctx)
    assert y.shape == x.shape and y.is_meta
    assert fc.total == hand_count()


def test_counter_agrees_with_flop_counter_mode_forward_and_backward():
    torch.manual_seed(0)
    block = Block()
    for p in block.parameters():
        p.requires_grad_(False)  # gradients for the input only, as CLoRA's latent update takes them
    x, ctx = _inputs("cpu")
    x.requires_grad_(True)
    with FlopCounterMode(display=False) as reference:
        block(x, ctx).square().sum().backward()
    mx = x.detach().to("meta").requires_grad_(True)
    mblock = Block().to("meta").requires_grad_(False)
    with FlopCounter() as fc:
        out = mblock(mx, ctx.to("meta"))
        (grad,) = torch.autograd.grad(out.square().sum(), mx)
    assert grad.shape == x.shape
    # FlopCounterMode leaves the CPU's fused attention uncounted; add the hand count of it: the
    # forward's two products, and the backward's two that the query's gradient needs (k and v
    # come from the context, which needs none)
    attn_fwd = attention_flops((2, 2, 64, 8), (2, 2, 7, 8), (2, 2, 7, 8))
    assert fc.total == reference.get_total_flops() + 2 * attn_fwd
    assert reference.get_total_flops() > hand_count() - attn_fwd  # backward counted on both sides


def test_formulas():
    assert linear_flops((2, 10, 16), (32, 16)) == 2 * 2 * 10 * 16 * 32
    assert attention_flops((1, 8, 4096, 40), (1, 8, 77, 40), (1, 8, 77, 40)) == 4 * 8 * 4096 * 77 * 40


def test_routed_lora_costs_its_rank_on_exactly_its_rows():
    """A rank-r delta on rows [2, 6) of 6 adds 2*rows*tokens*r*(in+out) FLOPs and nothing else."""
    rows, tokens, cin, cout, r = 6, 5, 16, 12, 4
    layer = torch.nn.Linear(cin, cout).to("meta")
    delta = LowRankDelta(torch.empty(r, cin, device="meta"), torch.empty(cout, r, device="meta"), 1.0, "linear")

    class State:
        routing = Routing(rows, ())
        products = None

    state = State()
    layer.register_forward_hook(RoutedLayer("l", {0: delta}, state))
    x = torch.empty(rows, tokens, cin, device="meta")
    with torch.inference_mode(), FlopCounter() as plain:
        layer(x)
    state.routing = Routing.blocks(2, [(1, 1.0), (0, 1.0), (1, 1.0)])  # only the middle copy has LoRA 0
    with torch.inference_mode(), FlopCounter() as routed:
        layer(x)
    assert plain.total == 2 * rows * tokens * cin * cout
    assert routed.total - plain.total == 2 * 2 * tokens * r * (cin + cout)


def test_a_routed_layer_tallies_its_deltas_products_as_torchs_counter_counts_them():
    """The tally Compare Methods reads (state.products) equals what torch's own FlopCounterMode adds
    when the deltas run: low-rank and dense deltas, a strided convolution, slices of a fused linear
    layer, a bias-only delta (no product), and rows that two LoRAs share."""
    g = torch.Generator().manual_seed(3)
    conv_opts = {"stride": (2, 2), "padding": (1, 1), "dilation": (1, 1), "groups": 1}
    conv = torch.nn.Conv2d(6, 8, 3, stride=2, padding=1)
    conv_deltas = {0: LowRankDelta(torch.randn(2, 6, 3, 3, generator=g), torch.randn(8, 2, 1, 1, generator=g), 1.0,
                                   "conv", conv_opts),
                   1: DenseDelta(torch.randn(8, 6, 3, 3, generator=g), None, "conv", conv_opts)}
    lin = torch.nn.Linear(6, 12)
    lin_deltas = {0: [LowRankDelta(torch.randn(2, 6, generator=g), torch.randn(4, 2, generator=g), 0.5, "linear",
                                   out=(4, 4)),
                      DenseDelta(torch.randn(4, 6, generator=g), None, "linear", out=(8, 4)),
                      DenseDelta(None, torch.ones(4), "linear", out=(8, 4))],
                  1: LowRankDelta(torch.randn(3, 6, generator=g), torch.randn(12, 3, generator=g), 1.0, "linear")}

    class State:
        routing = None
        products = None

    for layer, deltas, x in ((conv, conv_deltas, torch.randn(3, 6, 9, 9, generator=g)),
                             (lin, lin_deltas, torch.randn(3, 5, 7, 6, generator=g))):
        state = State()
        handle = layer.register_forward_hook(RoutedLayer("layer", deltas, state))
        with torch.no_grad(), FlopCounterMode(display=False) as plain:
            layer(x)
        state.routing = Routing(3, (Route(0, 0, 2, 0.5), Route(1, 1, 3, 2.0)))  # row 1 has both LoRAs
        state.products = [0]
        with torch.no_grad(), FlopCounterMode(display=False) as routed:
            layer(x)
        handle.remove()
        added = routed.get_total_flops() - plain.get_total_flops()
        assert added > 0 and state.products == [added], (type(layer).__name__, state.products, added)
