"""The GPU path of N:M mode: merged 2:4 weights as semi-structured sparse tensors (skips without a GPU).

Needs a CUDA device of compute capability >= 8.0 (sparse tensor cores); on CPU every test skips,
and `test_taskedge_lora.py::test_semi_structured_conversion_keeps_cpu_models_dense` covers the guard.
Imports only torch, timm and common/ (no Flower), so it also runs on a bare GPU machine with
`python -m pytest --noconftest tests/test_nm_gpu.py`.
"""
import pytest
import torch
from torch import nn

from common.taskedge.nm import check_nm, semi_structured_unsupported, to_semi_structured

WHY = semi_structured_unsupported("cuda", torch.float16)
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"semi-structured sparsity unavailable: {WHY}")


def _merged_nm_vit():
    """A TaskEdge N:M model (2:4 pruned base + trained deltas on kept entries), merged."""
    from timm.models.vision_transformer import VisionTransformer

    from common.taskedge.config import TaskEdgeConfig
    from common.taskedge.tuner import delta_layers, get_taskedge_model, merge_and_unload, nm_names

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=4, num_classes=10)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)]
    cfg = TaskEdgeConfig(budget=0.01, nm=(2, 4))
    names = nm_names(model, cfg)
    model, _ = get_taskedge_model(model, cfg, calib)
    with torch.no_grad():
        for layer in delta_layers(model).values():
            layer.values.normal_(0, 0.02)
    return merge_and_unload(model).eval(), names


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merged_nm_linears_run_semi_structured_and_match_dense(dtype):
    plain, names = _merged_nm_vit()
    assert all(v == 0 for v in check_nm(plain, 2, 4, names).values())
    dense = plain.to("cuda", dtype)
    sparse = _merged_nm_vit()[0].to("cuda", dtype)
    report = to_semi_structured(sparse)
    linears = [n for n in names if isinstance(dense.get_submodule(n), nn.Linear)]
    assert linears and all(report[n] == "semi-structured" for n in linears), report
    assert report["head"] != "semi-structured"  # the dense head is not 2:4: left dense, with a reason
    x = torch.randn(16, 3, 32, 32, device="cuda", dtype=dtype)
    with torch.no_grad():
        want, got = dense(x).float(), sparse(x).float()
    assert torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_float32_and_non_nm_weights_stay_dense():
    lin = nn.Linear(128, 256).cuda()
    assert to_semi_structured(lin) == {"": "dtype torch.float32 (semi-structured needs float16 or bfloat16)"}
    half = nn.Linear(128, 256).cuda().half()
    assert to_semi_structured(half) == {"": "weight is not 2:4 along the input"}
    assert half.weight.layout == torch.strided
