import torch

from pml_mutual.models import EmbeddingMLP, SmallCNN


def test_small_cnn_shapes_and_unit_norm():
    model = SmallCNN()
    for size in (28, 32):
        out = model(torch.randn(3, 1, size, size))
        assert out.shape == (3, 128)
        assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    assert 200_000 < sum(p.numel() for p in model.parameters()) < 400_000


def test_mlp_shapes_and_unit_norm():
    out = EmbeddingMLP()(torch.randn(4, 64))
    assert out.shape == (4, 64) and torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)
