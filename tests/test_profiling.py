"""benchmarks.profiling: the byte counts behind bench_step's memory figure, against hand sums.

float32 = 4 bytes, int64 = 8, bool = 1.
"""
import time

import pytest
import torch
from torch import nn

from benchmarks import profiling as P
from common.taskedge.layers import SparseDeltaConv2d


def _linear():
    torch.manual_seed(0)
    return nn.Linear(4, 3)  # weight 12 + bias 3 floats = 60 bytes


def test_a_view_costs_its_whole_storage():
    big = torch.zeros(2, 8)
    assert P.storage(big[:, :4]) == (big.data_ptr(), 2 * 8 * 4)


def test_model_storages_are_the_hand_sum_each_storage_once():
    model = nn.Sequential(_linear(), nn.BatchNorm1d(3))
    # Linear 60; BatchNorm weight, bias, running_mean, running_var 4 * 3 * 4 = 48, num_batches_tracked 8
    assert sum(P.model_storages(model).values()) == 60 + 48 + 8
    tied = nn.Sequential(model[0], nn.Linear(4, 3, bias=False))
    tied[1].weight = model[0].weight  # tied weights: one storage
    tied[1].register_buffer("row", model[0].weight.detach()[0])  # a buffer viewing a parameter
    assert sum(P.model_storages(tied).values()) == 60


def test_model_storages_count_the_conv_gather_index_cache():
    base = nn.Conv2d(2, 2, 3, padding=1, groups=2)
    layer = SparseDeltaConv2d(base, torch.tensor([0, 9]))  # kernel offset (0, 0) of both channels
    before = sum(P.model_storages(layer).values())
    layer(torch.randn(1, 2, 4, 4)).sum().backward()  # the value gradient fills the cache
    # 2 entries x 4 x 4 output positions: an int64 gather index (256) and, since offset (0, 0)
    # reads the zero padding at the border, a bool validity mask (32)
    assert sum(P.model_storages(layer).values()) - before == 2 * 16 * 8 + 2 * 16


def test_saved_tensor_meter_counts_exactly_the_saved_input():
    lin = _linear()
    x = torch.randn(2, 4)
    with P.saved_tensor_meter(P.model_storages(lin)) as saved:
        lin(x)  # weight gradient needs x; x needs no gradient, so the weight is not saved
    assert saved == {x.data_ptr(): 2 * 4 * 4}

    big = torch.randn(2, 8)
    with P.saved_tensor_meter(P.model_storages(lin)) as saved:
        lin(big[:, :4])  # the saved view keeps all of `big` alive
    assert saved == {big.data_ptr(): 2 * 8 * 4}


def test_saved_tensor_meter_counts_a_storage_once_and_skips_the_excluded():
    a, b = _linear(), nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with P.saved_tensor_meter(P.model_storages(a)) as saved:
        a(x) + b(x)  # both save x
    assert sum(saved.values()) == 32

    a.requires_grad_(False)
    xin = x.clone().requires_grad_(True)
    with P.saved_tensor_meter() as saved:
        a(xin)  # the input gradient needs the (frozen) weight
    assert saved == {a.weight.data_ptr(): 48}
    with P.saved_tensor_meter(P.model_storages(a)) as saved:
        a(xin)
    assert saved == {}


def test_optimizer_state_bytes_of_adamw():
    p = nn.Parameter(torch.zeros(10))
    opt = torch.optim.AdamW([p])
    assert P.optimizer_state_bytes(None) == 0 and P.optimizer_state_bytes(opt) == 0
    p.grad = torch.ones(10)
    opt.step()
    assert opt.state[p]["step"].dtype == torch.float32 and opt.state[p]["step"].dim() == 0
    assert P.optimizer_state_bytes(opt) == 2 * 10 * 4 + 4  # exp_avg, exp_avg_sq, step


def test_step_memory_full_and_floor():
    x, y = torch.randn(2, 4), torch.tensor([0, 2])
    # cross-entropy saves its log-softmax output (2 x 3 floats, saved twice: counted once), the
    # target (2 int64) and nll_loss's total weight (a float scalar): 24 + 16 + 4
    loss_saved = 24 + 16 + 4

    lin = _linear()
    opt = torch.optim.AdamW(lin.parameters())
    P.train_step(lin, opt, x, y)  # warm-up: the optimizer state exists from here on
    assert P.step_memory(lin, opt, x, y) == {
        "params": 60, "saved": 32 + loss_saved, "grads": 60, "optim": 2 * 60 + 2 * 4}

    frozen = _linear().requires_grad_(False)
    # floor: the frozen weight saved for the input gradient is a parameter (not counted again);
    # the only gradient is the input's (2 x 4 floats)
    assert P.step_memory(frozen, None, x, y, floor=True) == {
        "params": 60, "saved": loss_saved, "grads": 32, "optim": 0}


def test_peak_rss_reset_and_read():
    if not P.peak_rss_reset():
        pytest.skip("no /proc/self/clear_refs: the peak cannot be reset here")
    before = P.peak_rss_mb(True)
    block = torch.ones(16 * 1024 * 1024)  # 64 MiB, every page touched
    peak = P.peak_rss_mb(True)
    del block
    assert peak - before >= 60
    assert P.peak_rss_reset() and P.peak_rss_mb(True) <= peak - 60  # the reset forgot the block


def test_interleaved_times_go_round_robin_after_the_warmup():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: (calls.append("b"), time.sleep(0.002))}
    wall, cpu = P.interleaved_times(fns, warmup=2, reps=3)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert [len(wall[k]) for k in "ab"] == [len(cpu[k]) for k in "ab"] == [3, 3]
    assert min(wall["b"]) >= 0.002 and sum(cpu["b"]) < sum(wall["b"])  # sleeping costs no CPU


def test_importance_pass_times_a_no_grad_forward_against_the_stats_pass():
    lin, forwards, stats = _linear().train(), [], []
    lin.register_forward_hook(lambda m, i, o: forwards.append((m.training, torch.is_grad_enabled())))
    batches = [(torch.randn(2, 4), None)] * 2
    res = P.importance_pass_times(lin, lambda: (stats.append(1), time.sleep(0.003)), batches, repeats=3)
    assert forwards == [(False, False)] * (1 + 3) * 2  # eval mode, no_grad, every batch, each run
    assert len(stats) == 1 + 3
    assert res["stats_s"] >= 0.003 and res["ratio"] == res["stats_s"] / res["forward_s"]


def test_conv_value_grad_times_row():
    row = P.conv_value_grad_times(2, 4, 6, 3, 1, torch.Generator().manual_seed(0), warmup=1, reps=2)
    assert {k: row[k] for k in ("shape", "kernel", "stride", "entries")} == {
        "shape": [2, 4, 6, 6], "kernel": 3, "stride": 1, "entries": 4}


def test_conv_value_grad_times_refuses_to_time_a_wrong_gradient(monkeypatch):
    right = P.conv_value_grad
    monkeypatch.setattr(P, "conv_value_grad", lambda *a: right(*a) + 1)
    with pytest.raises(RuntimeError, match="sparse and dense value gradients differ for a depthwise 3x3 conv"):
        P.conv_value_grad_times(2, 4, 6, 3, 1, torch.Generator().manual_seed(0), warmup=1, reps=1)
