"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared, oversubscribed CPU OpenMP barriers make multi-threaded
    runs of tiny models erratically slow (seen: 10 s -> 280 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
