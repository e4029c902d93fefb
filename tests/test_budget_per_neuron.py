"""A budget in entries per output neuron: the same meaning on every model size."""
import pytest
import timm
import torch

from common.taskedge.allocation import budget_entries
from common.taskedge.config import TaskEdgeConfig
from common.taskedge.tuner import build_mask, target_modules


@pytest.mark.parametrize("name, kw", [("vit_tiny_patch16_224", {"img_size": 32, "depth": 2}), ("resnet10t", {})])
def test_per_neuron_budget_buys_k_entries_per_output_neuron_on_any_model(name, kw):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3, **kw)
    rows = sum(m.weight.shape[0] for m in target_modules(model, TaskEdgeConfig()).values())
    for k in (1, 2):
        mask = build_mask(model, TaskEdgeConfig(per_neuron=k, score="magnitude"), None)
        assert mask.num_entries == k * rows  # neuron-level allocation: k in every row
        assert all(int(torch.bincount(mask.indices[n] // mask.shapes[n][1]).min()) == k for n in mask.names())
    assert budget_entries(0.02, 10**6, 10**7, rows=100, per_neuron=1.5) == 150  # replaces the fraction


def test_per_neuron_budget_in_the_run_config_and_its_errors():
    from common.settings import parse_run_config

    assert parse_run_config({"budget-per-neuron": 1.0}).taskedge_config().per_neuron == 1.0
    with pytest.raises(ValueError, match="run config 'budget-per-neuron': must be a number >= 0"):
        parse_run_config({"budget-per-neuron": -1.0})
    with pytest.raises(ValueError, match="rounds to 0 entries"):
        budget_entries(0.02, 10**6, 10**7, rows=10, per_neuron=0.01)
