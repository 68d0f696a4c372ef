"""Shared set-up of the pytest-benchmark files here: every benchmark runs with
``FASTADV_BENCH_THREADS`` intra-op threads (default 2), restored afterwards."""
from __future__ import annotations

import os

import pytest
import torch

THREADS = int(os.environ.get("FASTADV_BENCH_THREADS", "2"))


@pytest.fixture(autouse=True)
def _bench_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(old)
