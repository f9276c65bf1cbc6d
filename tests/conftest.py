"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """One intra-op thread for a module of tiny models: on two shared cores a second thread makes tiny
    ops wait for a busy core (up to 100x slower). Restored afterwards, for the other modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
