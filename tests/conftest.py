"""Shared pytest fixtures.  Builders of synthetic windows live in ``tests/batches.py`` (plain module)."""
from __future__ import annotations

import pytest

from tests import batches


@pytest.fixture
def make_window():
    """Factory: ``make_window(n_fmri, n_eeg, t_f, samples_per_tr, subject, session, seed, ...) -> HeteroData``."""
    return batches.make_window


@pytest.fixture
def make_batch():
    """Factory: ``make_batch(n_windows, seed, **make_window_kwargs) -> Batch``."""
    return batches.make_batch


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is fastest and immune to other processes on shared cores."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
