"""Value gradients of the sparse-delta layers equal the masked dense gradient of a reference."""
import pytest
import torch
from torch import nn

from common.taskedge.layers import SparseDeltaConv2d, SparseDeltaLinear


def _random_mask(rows, width, per_row, gen):
    idx = torch.stack([torch.randperm(width, generator=gen)[:per_row] + r * width for r in range(rows)]).reshape(-1)
    return torch.sort(idx).values


def _uneven_mask(rows, width, counts, gen):
    """counts[r] entries in row r (0 allowed), canonical order."""
    idx = [torch.randperm(width, generator=gen)[:c] + r * width for r, c in enumerate(counts)]
    return torch.sort(torch.cat(idx)).values


def _check(base, wrapper, x, atol=1e-4, producer=None, kind=None):
    """Compare against W_eff = W0 + delta computed densely by autograd. ``producer`` (a module) makes
    the wrapper's input from x, so that the input can come back from what the producer saves;
    ``kind`` is the input source the wrapper must have used (ctx.kind: alias / ln / unary / full / cols)."""
    gen = torch.Generator().manual_seed(1)
    producer = producer or nn.Identity()
    with torch.no_grad():
        wrapper.values.copy_(torch.randn(wrapper.values.shape, generator=gen) * 0.1)
    x1 = x.clone().requires_grad_(True)
    y = wrapper(producer(x1))
    if kind is not None:
        assert y.grad_fn.kind == kind
    gy = torch.randn(y.shape, generator=gen)
    (y * gy).sum().backward()

    w = (base.weight.detach() + wrapper.get_delta_weight()).requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    if isinstance(base, nn.Linear):
        y_ref = nn.functional.linear(producer(x2), w, base.bias)
    else:
        y_ref = base._conv_forward(producer(x2), w, base.bias)
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


@pytest.mark.parametrize("counts", [
    [0, 2, 1, 3, 0, 1, 1],  # rows without entries: no lead, every entry gathers dY
    [1, 2, 1, 3, 1, 1, 4],  # one lead entry per row plus a rest
    [2, 2, 3, 2, 2, 5, 2],  # two lead entries per row plus a rest
])
def test_linear_uneven_rows(counts):
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(12, 7)
    _check(base, SparseDeltaLinear(base, _uneven_mask(7, 12, counts, gen)), torch.randn(3, 5, 12, generator=gen))


class _Scale(nn.Module):  # an op autograd saves nothing of the output for (x * 2 saves no tensor)
    def forward(self, x):
        return x * 2.0


@pytest.mark.parametrize("producer,kind", [
    (nn.LayerNorm(12), "ln"),
    (nn.LayerNorm(12, elementwise_affine=False), "ln"),
    (nn.GELU(), "unary"),
    (nn.GELU(approximate="tanh"), "unary"),
    (nn.SiLU(), "unary"),
    (nn.ReLU(), "alias"),  # ReLU saves its result: the input itself is kept alive
    (_Scale(), "cols"),
])
def test_linear_input_from_the_producers_saves(producer, kind):
    """The kept input columns come back from what the producer saves (no copy) and the value
    gradient still equals the dense reference."""
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(12, 7)
    if isinstance(producer, nn.LayerNorm) and producer.elementwise_affine:
        with torch.no_grad():
            producer.weight.normal_(generator=gen)
            producer.bias.normal_(generator=gen)
    idx = _uneven_mask(7, 12, [1, 2, 1, 1, 1, 1, 2], gen)  # reads some columns, not all
    layer = SparseDeltaLinear(base, idx)
    assert layer.ucols.numel() < 12
    _check(base, layer, torch.randn(3, 5, 12, generator=gen), producer=producer, kind=kind)


def test_linear_saves_nothing_beyond_the_layernorm_saves():
    from benchmarks.profiling import model_storages, saved_tensor_meter
    gen = torch.Generator().manual_seed(0)
    ln, base = nn.LayerNorm(12), nn.Linear(12, 7)
    layer = SparseDeltaLinear(base, _random_mask(7, 12, 1, gen))
    model = nn.Sequential(ln, layer)
    x = torch.randn(4, 12, generator=gen, requires_grad=True)
    with saved_tensor_meter(model_storages(model)) as with_layer:
        model(x)
    with saved_tensor_meter(model_storages(ln)) as ln_only:
        ln(x)
    assert sum(with_layer.values()) == sum(ln_only.values())


@pytest.mark.parametrize("kw,counts", [
    (dict(in_channels=4, out_channels=6, kernel_size=3, padding=1), [0, 2, 1, 3, 1, 1]),
    (dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1), [1, 2, 1, 3, 1, 1]),
    (dict(in_channels=4, out_channels=6, kernel_size=3, padding=1), [2, 3, 2, 2, 4, 2]),
    (dict(in_channels=6, out_channels=12, kernel_size=3, padding=1, groups=6), [1] * 6 + [2] * 6),
    (dict(in_channels=4, out_channels=6, kernel_size=1), [2, 1, 1, 3, 1, 2]),
])
@pytest.mark.parametrize("relu", [False, True])
def test_conv_uneven_channels_and_shared_input(kw, counts, relu):
    """Lead entries per output channel (dY used without a gather) plus a rest; after a ReLU the
    input is saved as the ReLU's own result (no copy of the kept channels)."""
    gen = torch.Generator().manual_seed(0)
    base = nn.Conv2d(**kw)
    width = base.weight[0].numel()
    counts = [min(c, width) for c in counts]
    layer = SparseDeltaConv2d(base, _uneven_mask(base.out_channels, width, counts, gen))
    x = torch.randn(2, base.in_channels, 9, 8, generator=gen)
    full = layer.uch.numel() == base.in_channels
    kind = "alias" if relu else ("full" if full else "cols")
    _check(base, layer, x, producer=nn.ReLU() if relu else None, kind=kind)


def test_conv_dense_grad_auto_picks_dense_only_for_a_dense_enough_ungrouped_mask():
    gen = torch.Generator().manual_seed(0)
    stem = nn.Conv2d(3, 8, 7, stride=2, padding=3)  # 147 weights per row
    many = SparseDeltaConv2d(stem, _random_mask(8, 147, 3, gen), dense_grad=None)  # 2 % of the weight
    few = SparseDeltaConv2d(stem, _random_mask(8, 147, 1, gen), dense_grad=None)  # 0.7 %
    dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    depthwise = SparseDeltaConv2d(dw, _random_mask(8, 9, 1, gen), dense_grad=None)  # 11 %, but grouped
    assert (many.dense_grad, few.dense_grad, depthwise.dense_grad) == (True, False, False)
    _check(stem, many, torch.randn(2, 3, 12, 12, generator=gen))


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


@pytest.mark.parametrize("kw", [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 1), padding=2, dilation=2),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding="same"),
    dict(in_channels=4, out_channels=6, kernel_size=3),  # no padding: every position valid
])
def test_conv_gather_index_kept_in_parts(monkeypatch, kw):
    """Above INDEX_CACHE_MAX the layer keeps the gather index as row + column parts (and the
    validity as row x column factors): same gradients, O(E (ho + wo)) memory instead of O(E ho wo)."""
    from common.taskedge import sparse_ops
    monkeypatch.setattr(sparse_ops, "INDEX_CACHE_MAX", 0)
    gen = torch.Generator().manual_seed(0)
    base = nn.Conv2d(**kw)
    width = base.weight[0].numel()
    layer = SparseDeltaConv2d(base, _uneven_mask(6, width, [1, 2, 1, 3, 1, 1], gen))
    _check(base, layer, torch.randn(2, 4, 9, 8, generator=gen))
    (parts,) = layer.index_cache.values()
    assert len(parts) == 4 and parts[0].shape[2] == 1 and parts[1].shape[1] == 1


@pytest.mark.parametrize("how", ["gather", "index_select"])
def test_both_column_gathers_give_the_same_gradients(monkeypatch, how):
    from common.taskedge import sparse_ops
    monkeypatch.setattr(sparse_ops, "GATHER", how)
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(12, 7)
    _check(lin, SparseDeltaLinear(lin, _uneven_mask(7, 12, [1, 2, 1, 3, 1, 1, 4], gen)), torch.randn(3, 5, 12, generator=gen))
    conv = nn.Conv2d(4, 6, 3, padding=1)
    _check(conv, SparseDeltaConv2d(conv, _uneven_mask(6, 36, [1, 2, 1, 3, 1, 1], gen)), torch.randn(2, 4, 9, 8, generator=gen))
