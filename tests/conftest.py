import os

import numpy as np
import pytest
import torch
from hypothesis import settings

# Property tests run on 2 CPU cores in CI: keep the example count moderate and deadlines off (torch warm-up).
settings.register_profile("ci", max_examples=40, deadline=None)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
