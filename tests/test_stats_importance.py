"""Activation statistics and importance scores against brute-force computations on stored activations."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.taskedge.importance import importance
from common.taskedge.stats import FeatureStats, StatsCollector, arrays_to_norms, stats_to_arrays, sum_stats


def _unfold_ss(conv: nn.Conv2d, x: torch.Tensor):
    """Brute force: explicitly unfold the (padded) input; column (c, u, v) is one unfolded feature."""
    xp = F.pad(x, conv._reversed_padding_repeated_twice)
    cols = F.unfold(xp.double(), conv.kernel_size, dilation=conv.dilation, stride=conv.stride)  # N, C*kh*kw, L
    ss = cols.pow(2).sum((0, 2)).reshape(conv.in_channels, *conv.kernel_size)
    return ss, cols.shape[0] * cols.shape[2]


def test_linear_stats_match_brute_force():
    lin = nn.Linear(6, 3)
    xs = [torch.randn(4, 5, 6), torch.randn(2, 6)]
    st = FeatureStats(lin)
    for x in xs:
        st.add_batch(x)
    flat = torch.cat([x.reshape(-1, 6) for x in xs]).double()
    assert st.n == 22
    assert torch.allclose(st.ss, flat.pow(2).sum(0))


@pytest.mark.parametrize("kw", [
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, padding=1, groups=2),
    dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6),  # depthwise
    dict(in_channels=3, out_channels=5, kernel_size=(3, 2), stride=(2, 1), dilation=2, padding=(2, 1)),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding="same"),
])
def test_conv_stats_match_unfold(kw):
    conv = nn.Conv2d(**kw)
    st = FeatureStats(conv)
    xs = [torch.randn(2, conv.in_channels, 9, 7), torch.randn(3, conv.in_channels, 9, 7)]
    ss_ref, n_ref = torch.zeros(conv.in_channels, *conv.kernel_size, dtype=torch.float64), 0
    for x in xs:
        st.add_batch(x)
        s, n = _unfold_ss(conv, x)
        ss_ref += s
        n_ref += n
    assert st.n == n_ref
    assert torch.allclose(st.ss, ss_ref)


def test_conv_importance_matches_unfolded_wanda():
    """|W[o, c', u, v]| * ||unfolded input feature (g*cpg + c', u, v)|| for a grouped conv."""
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    x = torch.randn(3, 4, 8, 8)
    st = FeatureStats(conv)
    st.add_batch(x)
    s = importance(conv, st.norm())
    cols = F.unfold(x.double(), 3, padding=1)  # N, 4*9, L
    feat_norm = (cols.pow(2).sum((0, 2)) / (cols.shape[0] * cols.shape[2])).sqrt().reshape(2, 18)
    ref = conv.weight.detach().abs().reshape(6, 18).double() * feat_norm.repeat_interleave(3, dim=0)
    assert torch.allclose(s.double(), ref, rtol=1e-5)


def test_collector_hooks_are_removed_and_stats_sum_across_devices():
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    mods = {"0": model[0], "2": model[2]}
    xa, xb = torch.randn(7, 5), torch.randn(3, 5)
    parts = []
    for x in (xa, xb):
        with StatsCollector(mods) as col:
            model(x)
        parts.append(col.state())
    assert not model[0]._forward_pre_hooks
    with StatsCollector(mods) as col:
        model(torch.cat([xa, xb]))
    pooled, central = sum_stats(parts), col.state()
    assert set(pooled) == set(central)
    for k in pooled:
        # layer 0 sees identical inputs (exact); deeper inputs differ by float32 matmul batching only
        np.testing.assert_allclose(pooled[k], central[k], rtol=1e-12 if k.startswith("0.") else 1e-6)
    norms = arrays_to_norms(pooled)
    assert torch.allclose(norms["0"], torch.cat([xa, xb]).pow(2).mean(0).sqrt(), rtol=1e-5)


def test_sum_stats_rejects_mismatch():
    a = stats_to_arrays({"m": FeatureStats(nn.Linear(3, 2))})
    b = {"m.ss": np.zeros(4), "m.n": np.array([1])}
    with pytest.raises(ValueError, match="m.ss"):
        sum_stats([a, b])


@pytest.mark.parametrize("method", ["magnitude", "activation", "random", "taskedge"])
def test_ablation_scores(method):
    lin = nn.Linear(4, 3)
    norm = torch.tensor([1.0, 2.0, 3.0, 4.0])
    g = torch.Generator().manual_seed(0)
    s = importance(lin, norm, method, g)
    w = lin.weight.detach().abs()
    expected = {"magnitude": w, "activation": norm.expand(3, 4), "taskedge": w * norm}.get(method)
    if expected is None:
        s2 = importance(lin, norm, method, torch.Generator().manual_seed(0))
        assert torch.equal(s, s2) and s.shape == (3, 4)
    else:
        assert torch.allclose(s, expected)


def test_importance_errors_name_the_problem():
    with pytest.raises(ValueError, match="score must be one of"):
        importance(nn.Linear(2, 2), None, "bogus")
    with pytest.raises(ValueError, match="needs activation statistics"):
        importance(nn.Linear(2, 2), None, "taskedge")
    with pytest.raises(TypeError, match="LayerNorm"):
        FeatureStats(nn.LayerNorm(3))
