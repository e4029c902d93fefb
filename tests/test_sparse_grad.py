"""Value gradients of the sparse-delta layers equal the masked dense gradient of a reference."""
import pytest
import torch
from torch import nn

from common.layers import SparseDeltaConv2d, SparseDeltaLinear


def _random_mask(rows, width, per_row, gen):
    idx = torch.stack([torch.randperm(width, generator=gen)[:per_row] + r * width for r in range(rows)]).reshape(-1)
    return torch.sort(idx).values


def _check(base, wrapper, x, atol=1e-4):
    """Compare against W_eff = W0 + delta computed densely by autograd."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        wrapper.values.copy_(torch.randn(wrapper.values.shape, generator=gen) * 0.1)
    x1 = x.clone().requires_grad_(True)
    y = wrapper(x1)
    gy = torch.randn(y.shape, generator=gen)
    (y * gy).sum().backward()

    w = (base.weight.detach() + wrapper.get_delta_weight()).requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    if isinstance(base, nn.Linear):
        y_ref = nn.functional.linear(x2, w, base.bias)
    else:
        y_ref = base._conv_forward(x2, w, base.bias)
    (y_ref * gy).sum().backward()
    assert torch.allclose(y, y_ref, atol=atol), (y - y_ref).abs().max()
    assert torch.allclose(x1.grad, x2.grad, atol=atol)
    g_ref = w.grad.flatten()[wrapper.flat_idx]
    assert torch.allclose(wrapper.values.grad, g_ref, atol=atol, rtol=1e-4), (wrapper.values.grad - g_ref).abs().max()
    assert base.weight.grad is None


@pytest.mark.parametrize("per_row", [1, 3])
def test_linear_value_grad_matches_dense(per_row):
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(12, 7)
    idx = _random_mask(7, 12, per_row, gen)
    _check(base, SparseDeltaLinear(base, idx), torch.randn(2, 5, 12, generator=gen))


@pytest.mark.parametrize("kw", [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, dilation=1),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 1), padding=2, dilation=2),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2),
    dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6),
    dict(in_channels=6, out_channels=12, kernel_size=3, padding=1, groups=6),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding="same"),
    dict(in_channels=4, out_channels=6, kernel_size=1),
])
@pytest.mark.parametrize("dense", [False, True])
def test_conv_value_grad_matches_dense(kw, dense):
    gen = torch.Generator().manual_seed(0)
    base = nn.Conv2d(**kw)
    width = base.weight[0].numel()
    idx = _random_mask(base.out_channels, width, min(2, width), gen)
    _check(base, SparseDeltaConv2d(base, idx, dense_grad=dense), torch.randn(2, base.in_channels, 9, 8, generator=gen))


def test_gradcheck_linear_double():
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(5, 4).double()
    layer = SparseDeltaLinear(base, _random_mask(4, 5, 2, gen))
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, v: torch.func.functional_call(layer, {"values": v}, (x,)),
                             (x, torch.randn(8, dtype=torch.float64, requires_grad=True)))


def test_bfloat16_saved_columns_close():
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(16, 8)
    idx = _random_mask(8, 16, 1, gen)
    layer = SparseDeltaLinear(base, idx, save_dtype="bfloat16")
    x = torch.randn(64, 16, generator=gen)
    layer(x).sum().backward()
    ref = SparseDeltaLinear(base, idx)
    ref(x).sum().backward()
    assert torch.allclose(layer.values.grad, ref.values.grad, rtol=2e-2, atol=2e-2)
