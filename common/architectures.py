"""The embedded models' architectures, registered with timm under their own names.

Three small timm models for 32x32 inputs (``EMBEDDED_MODELS``): a ViT whose Linear layers (qkv / proj /
fc1 / fc2) are the TaskEdge targets, and two CNNs for the edge benchmark, ``taskedge-resnet-tiny`` (timm
ResNet, BasicBlocks) and ``taskedge-mobilenetv2-tiny`` (timm's MobileNetV2 builder: inverted residuals with
depthwise convs). Importing this module registers them, so ``timm.create_model`` knows them; their
pre-trained weights are ``common.backbones``' job, building a model by name ``common.models``'.
"""

from __future__ import annotations

import timm
from timm.models import build_model_with_cfg, register_model
from timm.models.efficientnet import EfficientNet, decode_arch_def
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

__all__ = ["DEFAULT_MODEL", "EMBEDDED_MODELS"]

DEFAULT_MODEL = "taskedge-vit-tiny"
# public (hyphenated) name -> timm registry name (timm entrypoints are Python identifiers)
EMBEDDED_MODELS = {"taskedge-vit-tiny": "taskedge_vit_tiny", "taskedge-resnet-tiny": "taskedge_resnet_tiny",
                   "taskedge-mobilenetv2-tiny": "taskedge_mobilenetv2_tiny"}


def _cfg(**kw) -> dict:
    """Pretrained-cfg without a URL: weights come from embedded_backbone(), never the hub."""
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "classifier": "head",
        **kw,
    }


# read by timm's register_model (it looks up ``default_cfgs`` in the defining module)
default_cfgs = {
    "taskedge_vit_tiny": _cfg(first_conv="patch_embed.proj"),
    "taskedge_resnet_tiny": _cfg(first_conv="conv1", classifier="fc"),
    "taskedge_mobilenetv2_tiny": _cfg(first_conv="conv_stem", classifier="classifier"),
}


def _taskedge_vit_tiny(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT for 32x32 inputs: 16 patch tokens (8x8), 4 blocks of width 64, mean-pooled (~0.21 M parameters).

    Width 64 (was 128 up to PRETRAIN_VERSION 1) keeps a training step of batch 32 near 20 ms on one
    CPU core, which is what lets the federated benchmark run 6 tasks x 3 seeds x 2 partitions x 9
    methods x 10 rounds within an hour on 2 cores. 8x8 patches and mean pooling (no class token)
    keep pre-training short.
    """
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0,
                class_token=False, global_pool="avg")
    return build_model_with_cfg(VisionTransformer, "taskedge_vit_tiny", pretrained, **dict(args, **kwargs))


def _taskedge_resnet_tiny(pretrained: bool = False, **kwargs) -> ResNet:
    """timm ResNet for 32x32 inputs: BasicBlock stages [1, 1, 1, 1] of widths 16-32-64-128 (~0.33 M
    parameters, Conv2d targets only). timm's 7x7 stride-2 stem is kept, its max-pool dropped, so the
    stages run at 16, 8, 4 and 2 pixels instead of collapsing to 1x1 on 32x32 images."""
    args = {"block": BasicBlock, "layers": (1, 1, 1, 1), "channels": (16, 32, 64, 128), "stem_width": 16}
    model = build_model_with_cfg(ResNet, "taskedge_resnet_tiny", pretrained, **dict(args, **kwargs))
    model.maxpool = nn.Identity()
    return model


# MobileNetV2's inverted-residual stages (timm's block-string notation), shortened and narrowed for
# 32x32 inputs: expansion 4 instead of 6, five stages ending at 2x2.
_MOBILENETV2_TINY_ARCH = [["ds_r1_k3_s1_c16"], ["ir_r2_k3_s2_e4_c24"], ["ir_r2_k3_s2_e4_c32"],
                          ["ir_r2_k3_s1_e4_c64"], ["ir_r1_k3_s2_e4_c96"]]


def _taskedge_mobilenetv2_tiny(pretrained: bool = False, **kwargs) -> EfficientNet:
    """timm's MobileNetV2 (EfficientNet class, ReLU6, BatchNorm) with a small arch for 32x32 inputs
    (~0.15 M parameters): standard stem/head convs, depthwise 3x3 and pointwise 1x1 convs."""
    args = {"block_args": decode_arch_def(_MOBILENETV2_TINY_ARCH), "num_features": 256, "stem_size": 16,
            "act_layer": nn.ReLU6}
    return build_model_with_cfg(EfficientNet, "taskedge_mobilenetv2_tiny", pretrained, **dict(args, **kwargs))


_ENTRYPOINTS = {"taskedge_vit_tiny": _taskedge_vit_tiny, "taskedge_resnet_tiny": _taskedge_resnet_tiny,
                "taskedge_mobilenetv2_tiny": _taskedge_mobilenetv2_tiny}


def _register() -> None:
    """Register once; re-registering would make timm warn about overwriting."""
    for name, fn in _ENTRYPOINTS.items():
        if not timm.is_model(name):
            fn.__name__ = name  # timm registers the entrypoint under its function name
            register_model(fn)


_register()
