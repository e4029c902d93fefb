"""Budgets are spent to the entry, k per row, leftovers by score, nested masks, global ablation."""
import pytest
import torch

from common.taskedge.allocation import Mask, allocate, budget_entries, nm_keep


def _scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.rand(6, 10, generator=g), "b": torch.rand(4, 3, generator=g), "c": torch.rand(5, 8, generator=g)}


def test_neuron_level_k_per_row_and_leftover_by_score():
    s = _scores()
    rows = 6 + 4 + 5
    count = 2 * rows + 4
    m = allocate(s, count, "neuron")
    assert m.num_entries == count
    per_row = {n: torch.bincount(m.indices[n] // s[n].shape[1], minlength=s[n].shape[0]) for n in s}
    allr = torch.cat(list(per_row.values()))
    assert int(allr.min()) == 2 and int(allr.max()) == 3 and int((allr == 3).sum()) == 4
    # every row holds its own top-2
    for n, sc in s.items():
        top2 = torch.topk(sc, 2, dim=1).indices + torch.arange(sc.shape[0])[:, None] * sc.shape[1]
        assert set(top2.reshape(-1).tolist()) <= set(m.indices[n].tolist())
    # the 4 extra entries are the 4 best third-ranked entries over all rows
    third = torch.cat([torch.topk(sc, 3, dim=1).values[:, 2] for sc in (s["a"], s["b"], s["c"])])
    thr = torch.sort(third, descending=True).values[3]
    extra = [sc.reshape(-1)[m.indices[n][m.ranks[n] == 2]] for n, sc in s.items()]
    assert torch.cat(extra).min() >= thr


def test_saturated_rows_spill_budget_elsewhere():
    s = _scores()
    count = 6 * 5 + 4 * 3 + 5 * 5  # module b (width 3) saturates, others take rank 3 and 4
    m = allocate(s, count, "neuron")
    assert m.num_entries == count
    assert m.indices["b"].numel() == 12


@pytest.mark.parametrize("mode", ["neuron", "global"])
def test_nested_subset_property(mode):
    s = _scores(3)
    prev = None
    for count in (5, 15, 16, 31, 60, 100):
        m = allocate(s, count, mode)
        assert m.num_entries == count
        if prev is not None:
            for n in s:
                assert set(prev.indices[n].tolist()) <= set(m.indices[n].tolist())
        prev = m


def test_subset_by_rank_matches_smaller_budget():
    s = _scores(1)
    rows = 15
    big = allocate(s, 3 * rows, "neuron")
    small = allocate(s, 1 * rows, "neuron")
    sub = big.subset(1)
    for n in s:
        assert torch.equal(sub.indices[n], small.indices[n])
    pos = sub.positions_in(big)
    for n in s:
        assert torch.equal(big.indices[n][pos[n]], sub.indices[n])


def test_global_topk_is_global():
    s = _scores(2)
    m = allocate(s, 10, "global")
    allv = torch.cat([v.reshape(-1) for v in s.values()])
    chosen = torch.cat([s[n].reshape(-1)[m.indices[n]] for n in s])
    assert torch.allclose(torch.sort(chosen).values, torch.sort(torch.topk(allv, 10).values).values)


def test_mask_arrays_round_trip_and_validation():
    m = allocate(_scores(), 20, "neuron")
    arr = m.to_arrays()
    m2 = Mask.from_arrays(arr)
    for n in m.names():
        assert torch.equal(m.indices[n], m2.indices[n]) and torch.equal(m.ranks[n], m2.ranks[n])
    bad = dict(arr)
    bad["a.idx"] = bad["a.idx"][::-1].copy()
    with pytest.raises(ValueError, match="strictly increasing"):
        Mask.from_arrays(bad)


def test_budget_errors():
    assert budget_entries(0.001, 100_000, 50_000) == 100
    assert budget_entries(7, 100_000, 50_000) == 7
    for b in (0, -1, 0.0):
        with pytest.raises(ValueError, match="budget"):
            budget_entries(b, 100, 100)
    with pytest.raises(ValueError, match="only 50"):
        budget_entries(60, 1000, 50)
    with pytest.raises(ValueError, match="rounds to 0"):
        budget_entries(1e-9, 1000, 50)


def test_nm_keep_pattern():
    s = torch.rand(3, 8)
    keep = nm_keep(s, 2, 4)
    assert keep.reshape(3, 2, 4).sum(-1).eq(2).all()
    with pytest.raises(ValueError, match="multiple of M"):
        nm_keep(torch.rand(2, 6), 2, 4)
