import random

import numpy as np
import pytest
import torch

from m2_pretrain.layers.fused_bn import reset_self_check


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_fused_bn_self_check():
    """Each test sees the Momentum BN fused path unchecked: its first fused call in the test
    runs the self-check (one composite beside it), whatever ran before."""
    reset_self_check()
    yield
