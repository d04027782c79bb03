"""Shared fixtures."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def no_onednn():
    """oneDNN's per-shape kernel creation and thread spinning dominate tiny CPU convolutions (several times
    slower on a busy 2-core machine); the plain kernels compute the same convolutions."""
    saved = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = saved
