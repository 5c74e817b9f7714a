import multiprocessing
import os
import sys
from pathlib import Path

import pytest
import torch

# tests import their shared helpers (harness.py) by module name, also in the DDP ranks
sys.path.insert(0, str(Path(__file__).parent))
# the DDP tests' ranks start from a forkserver (harness.START_METHOD) that has imported these once per worker
multiprocessing.set_forkserver_preload(["torch", "lightning"])
os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
if "PYTEST_XDIST_WORKER" in os.environ:
    # `make test` runs one pytest worker per core: a second intra-op thread in each would only
    # spin-wait against the other worker's (the tests' models are tiny)
    torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """Tiny convolutions on a busy 2-core machine: two intra-op threads spin-wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
