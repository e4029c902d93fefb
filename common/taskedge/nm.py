"""N:M sparsity: pattern checks for merged weights, and the GPU path (semi-structured sparse weights).

With `nm` on, the base weight of every eligible module is pruned to N:M along the input dimension
(`tuner.apply_nm`), and the trainable entries are chosen among the kept ones (`tuner.build_mask`), so
W0 + delta — and therefore every merged weight, after local training and after federated
aggregation — keeps at most N nonzeros in every group of M consecutive inputs. `nm_violations` /
`check_nm` verify that on a plain (merged) model.

`to_semi_structured` is the GPU path: it swaps merged 2:4 Linear weights for
`torch.sparse.to_sparse_semi_structured` tensors, which run on the sparse tensor cores of NVIDIA
Ampere-or-newer GPUs (fp16 / bf16). It is guarded: on CPU, on an unsupported GPU or dtype, or for a
shape the kernels reject, the layer keeps its dense weight and the reason is returned. Only torch
is imported here, so the GPU benchmark runs on a machine that has nothing else.
"""
from __future__ import annotations

import torch
from torch import nn


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Groups of M consecutive inputs (per output row, on the (rows, width) view) with more than N
    nonzeros. 0 means the weight satisfies N:M."""
    w = weight.detach().reshape(weight.shape[0], -1)
    if w.shape[1] % m:
        raise ValueError(f"width {w.shape[1]} is not a multiple of M={m}")
    nnz = (w.reshape(w.shape[0], -1, m) != 0).sum(-1)
    return int((nnz > n).sum())


def check_nm(model: nn.Module, n: int, m: int, names: list[str] | None = None) -> dict[str, int]:
    """Violations per module: `names` (e.g. `tuner.nm_names`), else every Linear / Conv2d whose width is
    a multiple of M. Works on plain models and on wrapped ones (it reads the merged weight)."""
    mods = dict(model.named_modules())
    if names is None:
        names = [k for k, v in mods.items() if isinstance(v, (nn.Linear, nn.Conv2d)) and v.weight[0].numel() % m == 0]
    out = {}
    for name in names:
        mod = mods[name]
        w = mod.weight
        if hasattr(mod, "get_delta_weight"):  # a sparse-delta wrapper: check W0 + delta
            w = w + mod.get_delta_weight()
        out[name] = nm_violations(w, n, m)
    return out


def semi_structured_unsupported(device: torch.device | str | None = None,
                                dtype: torch.dtype = torch.float16) -> str | None:
    """Why semi-structured (2:4) kernels cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} (semi-structured needs float16 or bfloat16)"
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda":
        return f"device {dev} is not a CUDA device"
    major, minor = torch.cuda.get_device_capability(dev)
    if major < 8:
        return f"compute capability {major}.{minor} < 8.0 (sparse tensor cores need Ampere or newer)"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    return None


def to_semi_structured(model: nn.Module, names: list[str] | None = None) -> dict[str, str]:
    """Swap the weights of merged 2:4 nn.Linear layers for semi-structured sparse tensors (in place).

    Returns {module name: "semi-structured" or why it stayed dense}. Weights must already be 2:4
    along the input (what a merged N:M run exports); anything else is left dense. The weights
    become frozen (the sparse kernels serve inference and the frozen base of a training step).
    """
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or (names is not None and name not in names):
            continue
        w = mod.weight
        why = semi_structured_unsupported(w.device, w.dtype)
        if why is None and nm_violations(w, 2, 4):
            why = "weight is not 2:4 along the input"
        if why is None:
            try:
                sparse = torch.sparse.to_sparse_semi_structured(w.detach())
            except (RuntimeError, ValueError, NotImplementedError) as exc:  # shape / backend limits
                why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            else:
                mod.weight = nn.Parameter(sparse, requires_grad=False)
                why = "semi-structured"
        out[name] = why
    return out
