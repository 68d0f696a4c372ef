"""Test-session setup shared by every test module.

Triton runs on this CPU-only machine under its interpreter, which must be
switched on before triton is first imported: do it here, once, when no GPU is
present. Slow cases are skipped unless ``-m slow`` or ``FASTADV_SLOW=1``.
"""
import os

# On shared cores OpenMP's default spin-waiting makes every parallel region wait
# for a busy core (measured: a 5-minute attack test file drops to ~70 s). It must be
# set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Keep CPU runs reproducible and within the 2 cores of the CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """A test (or a CLI it runs) that sets torch's thread count must not change it for the
    tests after it: results that depend on it would then depend on the test order."""
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


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
