import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pml_mutual.checks import nonfinite_tensors

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64]
SPECIAL = [math.nan, math.inf, -math.inf]


def reference(obj, prefix=""):
    """The plain definition: every floating tensor, read element by element."""
    if torch.is_tensor(obj):
        return [prefix or "tensor"] if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else []
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += reference(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out += reference(v, f"{prefix}[{i}]")
    return out


@st.composite
def leaf(draw):
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(0, 40))
    if dtype == torch.int64:
        return torch.arange(n)
    # large finite values too: float64 beyond float32's range stays finite
    scale = 1e300 if dtype == torch.float64 and draw(st.booleans()) else 1.0
    t = (torch.randn(n, dtype=torch.float64) * scale).to(dtype)
    for _ in range(draw(st.integers(0, 2)) if n else 0):
        t[draw(st.integers(0, n - 1))] = draw(st.sampled_from(SPECIAL))
    return t


trees = st.recursive(
    leaf() | st.none() | st.integers(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.sampled_from("abcdef"), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(trees)
def test_nonfinite_tensors_names_exactly_the_tensors_holding_nan_or_inf(tree):
    assert nonfinite_tensors(tree) == reference(tree)


def test_nonfinite_tensors_names_nested_entries_in_order():
    state = {
        "model": {"w": torch.ones(3), "b": torch.tensor([0.0, math.nan])},
        "opt": [{"m": torch.tensor([math.inf]), "step": torch.tensor(3)}],
        "empty": torch.zeros(0),
    }
    assert nonfinite_tensors(state) == ["model.b", "opt[0].m"]
    assert nonfinite_tensors(torch.tensor([1e300], dtype=torch.float64)) == []
