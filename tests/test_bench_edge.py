"""benchmarks.bench_edge --quick, the live-peak meter and the GaLore conv wrapper."""
import json

import pytest
import torch
from torch import nn

from benchmarks.profiling import LiveTensorPeak, step_live_peak, train_step


def test_live_peak_counts_simultaneous_not_cumulative():
    with LiveTensorPeak(100) as m:
        for _ in range(4):
            a = torch.ones(1024, 256)  # 1 MiB
            b = a * 2  # 1 MiB more, while a is alive
            c = b.view(-1)  # a view: no new storage
            b.add_(1)  # in place: no new storage
            del a, b, c
    assert m.peak == 100 + 2 * 1024 * 1024
    assert m.live == 100


def test_step_live_peak_base_is_params_optimizer_and_batch():
    torch.manual_seed(0)
    model = nn.Linear(32, 4, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # no state
    x, y = torch.randn(8, 32), torch.randint(0, 4, (8,))
    train_step(model, opt, x, y)
    r = step_live_peak(model, opt, x, y)
    assert r["base"] == 32 * 4 * 4 + 8 * 32 * 4 + 8 * 8
    assert r["peak"] >= r["base"] + 32 * 4 * 4  # at least the weight gradient on top


def test_flat_galore_trains_conv_weights_in_place():
    from common import baselines

    try:
        baselines.load_galore_adamw()
    except baselines.MethodUnavailable:
        pytest.skip("galore-torch not installed")
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    dw = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)
    model = nn.Sequential(conv, dw, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    w0, d0 = conv.weight.detach().clone(), dw.weight.detach().clone()
    opt = baselines.FlatGaLore([conv.weight, dw.weight], [conv.bias], 1e-2, rank=2, gap=10, scale=0.25)
    x, y = torch.randn(2, 4, 5, 5), torch.tensor([0, 1])
    for _ in range(2):
        train_step(model, opt, x, y)
    assert not torch.equal(conv.weight, w0) and not torch.equal(dw.weight, d0)
    # low-rank state: the (6, 4*3*3) gradient is projected on its smaller side -> rank x 36; depthwise (6, 9) -> 2 x 9
    assert opt.state[opt.pairs[0][1]]["exp_avg"].shape == (2, 36)
    assert opt.state[opt.pairs[1][1]]["exp_avg"].shape == (2, 9)
    assert opt.projector_bytes() > 0


def test_quick_mode_writes_json(tmp_path):
    from benchmarks import bench_edge

    out = tmp_path / "q.json"
    res = bench_edge.main(["--quick", "--json", str(out), "--png", str(tmp_path / "q.png")])
    data = json.loads(out.read_text())
    rows = data["models"]["taskedge-mobilenetv2-tiny"]["methods"]
    assert set(rows) == {"fedavg-full", "taskedge"}
    for r in rows.values():
        # AdamW's elementwise update is 14 FLOPs per state element: one per trainable scalar (hand count)
        assert r["flops"]["optimizer_elementwise"] == 14 * r["trainable"]
        assert r["peak_mb"] * 2**20 >= 4 * 3 * r["trainable"]  # weights + gradient + 2 moments of what trains, >= 3x
    # the depthwise weight-gradient over-count: torch's raw count exceeds the corrected one for full FT
    assert rows["fedavg-full"]["flops_torch_raw"] > rows["fedavg-full"]["flops"]["total"]
    assert rows["taskedge"]["trainable"] < rows["fedavg-full"]["trainable"]
    assert (tmp_path / "q.png").stat().st_size > 0
    assert res["models"]["taskedge-mobilenetv2-tiny"]["peft_depthwise"][0]["adapter_over_base"] > 1


def test_live_peak_does_not_count_views_of_known_storages_again():
    a = torch.ones(1024, 256)  # 1 MiB that the base already holds
    ptr = a.untyped_storage().data_ptr()
    with LiveTensorPeak(100, known={ptr}) as m:
        a.detach().view(-1).add_(1)  # views and in-place updates of a counted storage: nothing new
        b = a * 2  # a genuinely new 1 MiB
        del b
    assert m.peak == 100 + 1024 * 1024 and m.live == 100


def test_step_live_peak_counts_a_taskedge_weight_once():
    """TaskEdge's forward patches the frozen weight through `weight.detach()`: a view of a parameter the
    base already holds, which must not be counted a second time (it was: +1 weight per wrapped layer)."""
    from common.taskedge.config import TaskEdgeConfig
    from common.taskedge.tuner import get_taskedge_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 4))
    x, y = torch.randn(4, 512), torch.randint(0, 4, (4,))
    model, _ = get_taskedge_model(model, TaskEdgeConfig(budget=0.001), [(x, y)])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    train_step(model, opt, x, y)
    r = step_live_peak(model, opt, x, y)
    weight = 512 * 512 * 4
    assert r["peak"] - r["base"] < weight // 4  # a few activations and small gradients, not another weight
