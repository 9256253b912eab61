"""Shared test setup."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run fastest on one intra-op thread when the cores are shared (oversubscription otherwise
    costs up to 10x). Session-wide, so that fixtures and tests compute with the same thread count (results
    compared bit for bit must not differ by a change in reduction order)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
