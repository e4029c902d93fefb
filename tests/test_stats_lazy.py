"""FeatureStats (Conv2d): batch-summed maps folded in lazily give the brute-force unfold sums, also
with mixed input sizes and reads of `ss` between batches."""
import torch
import torch.nn.functional as F
from torch import nn

from common.taskedge.stats import FeatureStats


def _unfold_ss(conv, x):
    cols = F.unfold(F.pad(x, conv._reversed_padding_repeated_twice).double(), conv.kernel_size,
                    dilation=conv.dilation, stride=conv.stride)
    return cols.pow(2).sum((0, 2)).reshape(conv.in_channels, *conv.kernel_size), cols.shape[0] * cols.shape[2]


def test_mixed_sizes_and_interleaved_reads():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4)
    st = FeatureStats(conv)
    ref, n = torch.zeros(4, 3, 3, dtype=torch.float64), 0
    for i, hw in enumerate([(9, 7), (8, 8), (9, 7), (5, 6)]):
        x = torch.randn(3, 4, *hw)
        st.add_batch(x)
        s, k = _unfold_ss(conv, x)
        ref, n = ref + s, n + k
        if i == 1:  # a read in between folds the pending maps in; later batches still count
            assert torch.allclose(st.ss, ref) and st.n == n
    assert st.n == n
    assert torch.allclose(st.ss, ref)
    assert torch.allclose(st.norm().double(), (ref / n).sqrt(), rtol=1e-6)


def test_ss_setter_drops_pending_maps():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    st = FeatureStats(conv)
    st.add_batch(torch.randn(2, 2, 5, 5))
    st.ss = torch.zeros(2, 3, 3, dtype=torch.float64)
    assert torch.equal(st.ss, torch.zeros(2, 3, 3, dtype=torch.float64))
