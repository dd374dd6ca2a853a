from .backbones import BACKBONES, EmbeddingNet, backbone_factory, build_backbone
from .bn_inception import BNInception, bn_inception, load_checkpoint_into
from .mlp import EmbeddingMLP
from .small_cnn import SmallCNN

__all__ = [
    "EmbeddingMLP",
    "SmallCNN",
    "BNInception",
    "bn_inception",
    "load_checkpoint_into",
    "EmbeddingNet",
    "BACKBONES",
    "build_backbone",
    "backbone_factory",
]
