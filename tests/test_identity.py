"""Fingerprints of a run's identity (pml_mutual.identity)."""

import warnings

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pml_mutual.data import ImageItems, ImageListDataset
from pml_mutual.identity import dataset_fingerprint, factory_fingerprint, model_fingerprint
from pml_mutual.models import EmbeddingMLP, SmallCNN
from pml_mutual.models.backbones import backbone_factory, bn_inception


def test_the_architecture_fingerprint_built_on_the_meta_device_is_the_cpu_builds(tmp_path):
    torch.save(bn_inception().state_dict(), tmp_path / "w.pth")
    pretrained = backbone_factory("bninception", tmp_path / "w.pth")  # loads weights into what it builds
    for factory in (
        EmbeddingMLP,
        lambda: SmallCNN(in_channels=3),
        pretrained,
        lambda: EmbeddingMLP().double(),
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fingerprint = factory_fingerprint(factory)
        assert fingerprint == model_fingerprint(factory())
        assert not caught  # the meta build's no-op weight copies say nothing
    assert factory_fingerprint(EmbeddingMLP) != factory_fingerprint(lambda: EmbeddingMLP().double())


def test_a_factory_that_reads_weight_values_is_built_on_the_cpu():
    built = []

    def reads_a_value():
        model = EmbeddingMLP()
        built.append(next(model.parameters()).device.type)
        if next(model.parameters()).abs().sum().item() < 0:  # .item() cannot run on the meta device
            raise AssertionError("unreachable")
        return model

    assert factory_fingerprint(reads_a_value) == model_fingerprint(EmbeddingMLP())
    assert built == ["meta", "cpu"]


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 700), data=st.data())
def test_changing_any_one_box_changes_the_dataset_fingerprint(n, data):
    """Boxes crop the images (Cars196 --crop, DeepFashion2): a corrected annotation file is other data,
    wherever in the list the change is (numpy's repr elides the middle of long arrays)."""
    i = data.draw(st.integers(0, n - 1))
    boxes = np.tile(np.array([[1.0, 2.0, 30.0, 40.0]]), (n, 1))
    changed = boxes.copy()
    changed[i, data.draw(st.integers(0, 3))] += 1.0

    def fingerprint(b):
        return dataset_fingerprint(
            ImageListDataset(ImageItems("/data", [f"x{j}.jpg" for j in range(n)], np.zeros(n), b))
        )

    assert fingerprint(boxes) != fingerprint(changed)
    assert fingerprint(boxes) == fingerprint(boxes.copy())
