"""One torch thread for the examples' tests: their tensors are tiny, and on a shared 2-core machine two threads
spin against each other (a 31-parameter Hessian-vector product measured ~100x slower with 2 threads than 1)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
