"""ResNet-50 and ViT-B/16 embedding networks (need torchvision; skipped without it)."""

import pytest
import torch

tvm = pytest.importorskip("torchvision.models")

from pml_mutual.models import backbone_factory, build_backbone  # noqa: E402


@pytest.mark.parametrize(
    "name, make, head",
    [
        ("resnet50", lambda: tvm.resnet50(weights=None), "fc."),
        ("vit_b16", lambda: tvm.vit_b_16(weights=None), "heads."),
    ],
)
def test_torchvision_backbone_loads_a_torchvision_checkpoint(tmp_path, name, make, head):
    reference = make()
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    net = build_backbone(name, tmp_path / "w.pth").eval()
    with torch.no_grad():
        emb = net(torch.randn(2, 3, 224, 224))
    assert emb.shape == (2, 512) and torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-4)
    loaded = dict(net.trunk.named_parameters())
    # every trunk weight is the checkpoint's (the first conv / patch embedding, as a spot check)
    first = next(v for k, v in reference.state_dict().items() if not k.startswith(head) and v.dim() == 4)
    assert any(torch.equal(first, v) for v in loaded.values())
    factory = backbone_factory(name, tmp_path / "w.pth")
    a, b = factory(), factory()
    assert all(
        torch.equal(x, y) for x, y in zip(a.trunk.state_dict().values(), b.trunk.state_dict().values())
    )
    assert not torch.equal(a.embedding.weight, b.embedding.weight)  # a fresh head for every network


def test_wrong_checkpoint_for_resnet(tmp_path):
    torch.save(tvm.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="ResNet-50"):
        build_backbone("resnet50", tmp_path / "r18.pth")
