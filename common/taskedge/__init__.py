"""TaskEdge: task-aware sparse fine-tuning, on its own (no Flower, no messages, no run config).

The algorithm of the project as a library, used the way peft's tuners are: a config dataclass
(`TaskEdgeConfig`), calibration statistics (`stats`), importance scores (`importance`,
`gradient_score`), the neuron-level allocation (`allocation`), sparse-delta layers and their kernels
(`layers`, `sparse_ops`), the injector with `merge_and_unload` (`tuner`), TaskEdge + LoRA (`lora`) and
N:M (`nm`). The federation (`common/` beside this package, `client/`, `server/`) builds on it; nothing
here imports from there.

    from common.taskedge import TaskEdgeConfig, get_taskedge_model, merge_and_unload
"""
from .config import TaskEdgeConfig

__all__ = ["TaskEdgeConfig", "get_taskedge_model", "merge_and_unload", "print_trainable_parameters"]


def __getattr__(name: str):
    """The tuner's entry points on first use: importing the package (e.g. for its config, as the run-config
    check does) must not import torch."""
    if name in __all__:
        from . import tuner

        return getattr(tuner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
