"""benchmarks.flops: exact FLOP counts against the analytic formulas (2 FLOPs per multiply-accumulate)."""
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.flops import (
    ADAMW_FLOPS_PER_ELEMENT,
    conv2d_flops,
    flop_counter,
    linear_flops,
    step_flops,
)
from common.taskedge.layers import SparseDeltaConv2d, SparseDeltaLinear


def _fwd_bwd(mod, x, counter):
    with counter as fc:
        out = mod(x)
        fwd = fc.get_total_flops()
        out.sum().backward()
        bwd = fc.get_total_flops() - fwd
    return fwd, bwd, out


# (c_in, c_out, k, stride, pad, groups, size)
CONVS = {
    "depthwise": (32, 32, 3, 1, 1, 32, 14),
    "grouped": (16, 32, 3, 2, 1, 4, 15),
    "standard": (8, 12, 3, 1, 0, 1, 10),
}


@pytest.mark.parametrize("kind", list(CONVS))
def test_conv_forward_backward_exact(kind):
    c_in, c_out, k, s, p, g, size = CONVS[kind]
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, k, s, p, groups=g, bias=False)
    x = torch.randn(2, c_in, size, size, requires_grad=True)
    fwd, bwd, out = _fwd_bwd(conv, x, flop_counter())
    ho, wo = out.shape[2:]
    f = conv2d_flops(2, c_in, c_out, ho, wo, k, k, g)
    assert fwd == f
    assert bwd == 2 * f  # input gradient + weight gradient, each as many MACs as the forward
    # weight gradient only (frozen input)
    x2 = torch.randn(2, c_in, size, size)
    conv.zero_grad()
    assert _fwd_bwd(conv, x2, flop_counter())[1] == f


@pytest.mark.parametrize("kind", list(CONVS))
def test_torch_overcounts_grouped_weight_gradient_by_groups(kind):
    """Pins the bug we correct: torch's own counter counts the weight gradient `groups` times.
    If a future torch fixes it, this test fails and the correction must go."""
    c_in, c_out, k, s, p, g, size = CONVS[kind]
    conv = nn.Conv2d(c_in, c_out, k, s, p, groups=g, bias=False)
    x = torch.randn(2, c_in, size, size)  # weight gradient only
    fwd, bwd, out = _fwd_bwd(conv, x, FlopCounterMode(display=False))
    f = conv2d_flops(2, c_in, c_out, *out.shape[2:], k, k, g)
    assert fwd == f
    assert bwd == g * f


def test_depthwise_paper_shape():
    """The edge-PEFT note's example: depthwise C=32 on 56x56, batch 1."""
    conv = nn.Conv2d(32, 32, 3, 1, 1, groups=32, bias=False)
    x = torch.randn(1, 32, 56, 56)
    fwd, bwd, _ = _fwd_bwd(conv, x, flop_counter())
    assert fwd == bwd == 1_806_336
    assert _fwd_bwd(conv, x, FlopCounterMode(display=False))[1] == 57_802_752


def test_linear_forward_backward_exact():
    lin = nn.Linear(24, 40)
    x = torch.randn(3, 5, 24, requires_grad=True)
    fwd, bwd, _ = _fwd_bwd(lin, x, flop_counter())
    f = linear_flops(15, 24, 40)
    assert fwd == f and bwd == 2 * f
    lin.zero_grad()
    assert _fwd_bwd(lin, x.detach(), flop_counter())[1] == f


def test_sparse_delta_linear_value_grad():
    """TaskEdge Linear: forward = one dense GEMM; backward = input gradient GEMM (torch counts it)
    + the value gradient, 2·T·E (one multiply and one add per token and entry, added analytically)."""
    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    idx = torch.sort(torch.randperm(24 * 40)[:17]).values
    layer = SparseDeltaLinear(base, idx)
    x = torch.randn(3, 5, 24)
    opt = torch.optim.AdamW([layer.values], lr=1e-3)
    lf = lambda out, _y: out.sum()
    r = step_flops(layer, opt, x, None, loss_fn=lf)  # warm-up: optimizer state exists afterwards
    r = step_flops(layer, opt, x, None, loss_fn=lf)
    assert r["forward"] == linear_flops(15, 24, 40)
    assert r["sparse_value_grad"] == 2 * 15 * 17
    assert r["backward"] == 2 * 15 * 17  # frozen input: no input gradient
    assert r["optimizer"] == ADAMW_FLOPS_PER_ELEMENT * 17
    r = step_flops(layer, opt, x, None, floor=True, loss_fn=lf)  # input needs grad too
    assert r["backward"] == linear_flops(15, 24, 40) + 2 * 15 * 17


@pytest.mark.parametrize("dense", [False, True])
def test_sparse_delta_depthwise_conv_value_grad(dense):
    torch.manual_seed(0)
    c, size = 16, 9
    base = nn.Conv2d(c, c, 3, 2, 1, groups=c, bias=False)
    idx = torch.sort(torch.randint(0, 9, (c,)) + torch.arange(c) * 9).values  # one entry per channel
    layer = SparseDeltaConv2d(base, idx, dense_grad=dense)
    x = torch.randn(2, c, size, size, requires_grad=True)
    fwd, bwd, out = _fwd_bwd(layer, x, flop_counter())
    ho, wo = out.shape[2:]
    f = conv2d_flops(2, c, c, ho, wo, 3, 3, c)
    assert fwd == f
    # torch counts the input gradient; the value gradient is not an aten op torch counts
    # (sparse mode) or is torch's dense weight gradient (dense mode, corrected for groups)
    assert bwd == (2 * f if dense else f)
    from benchmarks.flops import sparse_value_grad_flops
    with sparse_value_grad_flops(layer) as sv:
        layer(x)
    assert sv[0] == (0 if dense else 2 * 2 * ho * wo * c)


def test_step_flops_full_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x, y = torch.randn(2, 3, 6, 6), torch.tensor([0, 3])
    opt = torch.optim.AdamW(model.parameters())
    step_flops(model, opt, x, y)
    r = step_flops(model, opt, x, y)
    c1, c2, lin = conv2d_flops(2, 3, 8, 6, 6, 3, 3), conv2d_flops(2, 8, 8, 6, 6, 3, 3, 8), linear_flops(2, 8, 4)
    assert r["forward"] == c1 + c2 + lin
    # first conv: weight grad only (input needs none); depthwise + linear: input and weight grads
    assert r["backward"] == c1 + 2 * c2 + 2 * lin
    n = sum(p.numel() for p in model.parameters())
    assert r["optimizer"] == ADAMW_FLOPS_PER_ELEMENT * n
    assert r["total"] == r["forward"] + r["backward"] + r["optimizer"]
