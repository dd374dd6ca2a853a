import torch
from helpers.host_reads import host_reads
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning.reducers import AvgNonZeroReducer

from pml_mutual.reducers import DeviceAvgNonZeroReducer


def element(losses):
    return {"loss": {"losses": losses, "indices": torch.arange(len(losses)), "reduction_type": "element"}}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.just(0.0), st.floats(-10, 10, allow_nan=False)), min_size=1, max_size=40))
def test_equals_pml_avg_non_zero_reducer(values):
    losses = torch.tensor(values, dtype=torch.float64)
    emb = torch.zeros(len(values), 2, dtype=torch.float64)
    ours = DeviceAvgNonZeroReducer()(element(losses), emb, None)
    theirs = AvgNonZeroReducer()(element(losses), emb, None)
    # the same positive terms, summed by a different kernel
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-15)


def test_gradient_only_to_the_positive_losses_and_no_host_read():
    losses = torch.tensor([0.5, 0.0, -1.0, 1.5], requires_grad=True)
    emb = torch.zeros(4, 2)
    assert host_reads(lambda: DeviceAvgNonZeroReducer()(element(losses), emb, None).backward()) == []
    assert torch.equal(losses.grad, torch.tensor([0.5, 0.0, 0.0, 0.5]))


def test_a_nan_loss_is_not_dropped_but_makes_the_mean_nan():
    """PML's reducer keeps only losses > 0, which drops NaN and leaves a finite loss over NaN gradients."""
    losses = torch.tensor([0.5, float("nan"), 0.0])
    assert torch.isnan(DeviceAvgNonZeroReducer()(element(losses), torch.zeros(3, 2), None))
