"""The paper's backbones as embedding networks: BN-Inception, ResNet-50 and ViT-B/16 → 512-d, L2-normalised.

Pretrained weights come from a file the user names (nothing is downloaded): BN-Inception's Caffe
conversion, torchvision's ``resnet50-*.pth`` / ``vit_b_16-*.pth``. ResNet-50 and ViT need torchvision
(``pip install 'pml-mutual[vision]'``); BN-Inception is implemented here. BatchNorm freezing is the
trainer's job (``OnlineConfig.freeze_batchnorm=True``, the paper's setting).
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .bn_inception import FEATURE_SIZE, bn_inception, load_checkpoint_into

BACKBONES = ("bninception", "resnet50", "vit_b16")
# The backbone's expected input (see pml_mutual.data.transforms.INPUT_SPACES) and the paper's batch (classes ×
# images).
INPUT_SPACE = {"bninception": "bgr255", "resnet50": "imagenet", "vit_b16": "imagenet"}
BATCH = {"bninception": (16, 5), "resnet50": (16, 3), "vit_b16": (16, 3)}


class EmbeddingNet(nn.Module):
    """trunk → global pool (feature maps only) → Linear(in_features, embedding_size) → L2 normalisation.

    ``pool="max"`` is the paper's choice for BN-Inception; a trunk returning (N, C) vectors skips pooling.
    """

    def __init__(self, trunk: nn.Module, in_features: int, embedding_size: int = 512, pool: str = "max"):
        super().__init__()
        if pool not in ("max", "avg"):
            raise ValueError(f"pool must be 'max' or 'avg', got {pool!r}")
        self.trunk = trunk
        self.pool = pool
        self.embedding = nn.Linear(in_features, embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        if h.dim() == 4:
            h = h.amax(dim=(2, 3)) if self.pool == "max" else h.mean(dim=(2, 3))
        return F.normalize(self.embedding(h), dim=1)


def _torchvision(name: str):
    try:
        import torchvision.models as tvm
    except ImportError as e:
        raise ImportError(f"the {name} backbone needs torchvision: pip install 'pml-mutual[vision]'") from e
    return tvm


def resnet50_trunk(weights: str | os.PathLike | None = None) -> tuple[nn.Module, int]:
    """torchvision ResNet-50 up to layer4 (feature map, 2048 channels); ``weights``: a torchvision state
    dict."""
    tvm = _torchvision("resnet50")
    model = tvm.resnet50(weights=None)
    model.fc = nn.Identity()  # the ImageNet classifier is dropped before loading
    if weights is not None:
        load_checkpoint_into(model, weights, "ResNet-50", ignore_prefixes=("fc.",))
    trunk = nn.Sequential(
        *(
            getattr(model, k)
            for k in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        )
    )
    return trunk, 2048


class _ViTClassToken(nn.Module):
    """torchvision ViT without its head: the class token after the final LayerNorm, (N, 768)."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.vit._process_input(x)
        h = torch.cat([self.vit.class_token.expand(h.shape[0], -1, -1), h], dim=1)
        return self.vit.encoder(h)[:, 0]


def vit_b16_trunk(weights: str | os.PathLike | None = None) -> tuple[nn.Module, int]:
    """torchvision ViT-B/16 (224×224 input) returning the class token; ``weights``: a torchvision state
    dict."""
    tvm = _torchvision("vit_b16")
    model = tvm.vit_b_16(weights=None)
    model.heads = nn.Identity()
    if weights is not None:
        load_checkpoint_into(model, weights, "ViT-B/16", ignore_prefixes=("heads.",))
    return _ViTClassToken(model), model.hidden_dim


def build_backbone(
    name: str, weights: str | os.PathLike | None = None, embedding_size: int = 512
) -> EmbeddingNet:
    """One embedding network of the paper: ``name`` in :data:`BACKBONES`, pretrained from ``weights`` if
    given."""
    if name == "bninception":
        return EmbeddingNet(bn_inception(weights), FEATURE_SIZE, embedding_size, pool="max")
    if name == "resnet50":
        trunk, d = resnet50_trunk(weights)
        return EmbeddingNet(trunk, d, embedding_size, pool="avg")
    if name == "vit_b16":
        trunk, d = vit_b16_trunk(weights)
        return EmbeddingNet(trunk, d, embedding_size)
    raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")


def supported_image_sizes(name: str, sizes) -> list[int]:
    """Which square input sizes ``name`` takes: a shape-only forward pass on the meta device (no weights,
    no memory, no compute). BN-Inception's inception branches disagree in size for many crops (48, 80,
    112, ...); ViT-B/16 takes 224 only."""
    with torch.device("meta"):
        model = build_backbone(name).eval()
    ok = []
    for size in sizes:
        try:
            model(torch.empty(2, 3, int(size), int(size), device="meta"))
            ok.append(int(size))
        except (RuntimeError, ValueError, AssertionError):
            pass
    return ok


def check_image_size(name: str, size: int) -> None:
    """A ValueError naming nearby sizes that work when backbone ``name`` cannot take ``size`` × ``size``
    crops."""
    if supported_image_sizes(name, [size]):
        return
    near = sorted(range(max(16, size - 64), size + 65, 8), key=lambda s: (abs(s - size), s))
    works = sorted(supported_image_sizes(name, near)[:4]) or supported_image_sizes(name, [224])
    raise ValueError(
        f"the {name} backbone cannot take {size}×{size} images; sizes that work near it: {works}"
    )


def backbone_factory(
    name: str, weights: str | os.PathLike | None = None, embedding_size: int = 512
) -> Callable[[], nn.Module]:
    """A ``model_factory`` for :class:`~pml_mutual.OnlineLearner`: checks the weights once, then builds
    each network from a CPU copy of the pretrained state (the file is read only once). Without weights
    every network is freshly random (so F_s differs from F_0)."""
    if weights is None:
        return lambda: build_backbone(name, None, embedding_size)
    template = build_backbone(name, weights, embedding_size)
    trunk_state = {k: v.clone() for k, v in template.trunk.state_dict().items()}
    del template

    def factory() -> nn.Module:
        model = build_backbone(name, None, embedding_size)
        model.trunk.load_state_dict(trunk_state)
        return model

    return factory


def check_batch_memory(batch: int, size: int, device: torch.device) -> None:
    """Refuse crops whose batch of float32 inputs alone would take over an eighth of the device's memory
    (activations take many times the input): ``--image-size 100000`` would grow to tens of GB before the
    kernel killed it."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    need = batch * 3 * size * size * 4
    if need > total / 8:
        fits = int((total / 8 / (batch * 3 * 4)) ** 0.5)
        raise SystemExit(
            f"--image-size {size}: a batch of {batch} crops is {need / 2**30:.1f} GiB of inputs alone, over "
            f"an eighth of the {total / 2**30:.0f} GiB of {device}; use a size of at most {fits} (the "
            "protocol's is 224)"
        )
