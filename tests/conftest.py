"""Test-session setup shared by every test module.

Triton runs on this CPU-only machine under its interpreter, which must be
switched on before triton is first imported: do it here, once, when no GPU is
present. Slow cases are skipped unless ``-m slow`` or ``FASTADV_SLOW=1``.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Keep CPU runs reproducible and within the 2 cores of the CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    run_slow = os.environ.get("FASTADV_SLOW") == "1" or "slow" in (config.getoption("-m") or "")
    run_gpu = torch.cuda.is_available()
    skip_slow = pytest.mark.skip(reason="slow: run with -m slow or FASTADV_SLOW=1")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not run_gpu:
            item.add_marker(skip_gpu)
