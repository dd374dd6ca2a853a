"""BN-Inception: architecture, and loading the Caffe-converted state dict by its reference key names."""

import pytest
import torch

from pml_mutual.models import BNInception, bn_inception, build_backbone
from pml_mutual.models.backbones import EmbeddingNet


def test_parameter_count_and_output_shapes():
    full = BNInception(num_classes=1000)
    # the released ImageNet model (Caffe conversion) has 11,295,240 parameters
    assert sum(p.numel() for p in full.parameters()) == 11_295_240
    trunk = BNInception().eval()
    with torch.no_grad():
        assert trunk(torch.randn(2, 3, 224, 224)).shape == (2, 1024, 7, 7)
        assert trunk(torch.randn(1, 3, 32, 32)).shape == (1, 1024, 1, 1)
    net = build_backbone("bninception").eval()
    with torch.no_grad():
        emb = net(torch.randn(3, 3, 64, 64))
    assert emb.shape == (3, 512) and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    assert isinstance(net, EmbeddingNet) and net.pool == "max"


def _reference_checkpoint(path, squeeze_bn=True, prefix=""):
    """A checkpoint laid out like the widely used Caffe conversion: our keys, the ImageNet classifier,
    and BatchNorm buffers stored as (1, C) as in that file."""
    source = BNInception(num_classes=1000)
    with torch.no_grad():
        for p in source.parameters():
            p.uniform_(-0.1, 0.1)
    state = {}
    for k, v in source.state_dict().items():
        if squeeze_bn and k.endswith(("running_mean", "running_var")):
            v = v.unsqueeze(0)
        state[prefix + k] = v
    torch.save(state, path)
    return source


def test_loads_reference_key_names_and_drops_the_classifier(tmp_path):
    source = _reference_checkpoint(tmp_path / "bn_inception.pth", prefix="module.")
    model = bn_inception(tmp_path / "bn_inception.pth")
    ours, theirs = model.state_dict(), source.state_dict()
    assert set(theirs) - set(ours) == {"last_linear.weight", "last_linear.bias"}
    for k, v in ours.items():
        assert torch.equal(v, theirs[k]), k


def test_wrapped_checkpoint_loads(tmp_path):
    source = BNInception()
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, tmp_path / "w.pth")
    model = bn_inception(tmp_path / "w.pth")
    assert torch.equal(model.conv1_7x7_s2.weight, source.conv1_7x7_s2.weight)


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="BN-Inception weights not found"):
        bn_inception(tmp_path / "missing.pth")
    state = BNInception().state_dict()
    del state["inception_4c_pool_proj.weight"]
    state["extra_layer.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="inception_4c_pool_proj.weight.*extra_layer.weight"):
        bn_inception(tmp_path / "bad.pth")
    state = BNInception().state_dict()
    state["conv1_7x7_s2.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="conv1_7x7_s2.weight has shape"):
        bn_inception(tmp_path / "shape.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ValueError, match="state dict"):
        bn_inception(tmp_path / "tensor.pth")


def test_unknown_backbone():
    with pytest.raises(ValueError, match="backbone must be one of"):
        build_backbone("alexnet")


def test_weights_files_that_are_not_state_dicts_or_not_finite_are_named(tmp_path):
    import torch

    from pml_mutual.models.bn_inception import bn_inception

    text = tmp_path / "weights.txt"
    text.write_text("not weights")
    with pytest.raises(ValueError, match=r"weights.txt is not a PyTorch state dict file"):
        bn_inception(text)
    state = bn_inception().state_dict()
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}
    nan = tmp_path / "nan.pth"
    torch.save(state, nan)
    with pytest.raises(ValueError, match=r"nan.pth holds NaN or inf values"):
        bn_inception(nan)
