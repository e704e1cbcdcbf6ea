import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

# The oracles must never reach for the hub: offline, they fail at once instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and beside any other busy process OpenMP waits slow them 20x."""
    yield from _threads(1)


@pytest.fixture
def two_threads():
    """A fixed thread count for bit-for-bit comparisons across batch shapes: CPU kernels split their work by tensor
    size and thread count, and with more threads an elementwise kernel's split moved the last bit for some batch
    shapes (seen at 8 threads, batch 3)."""
    yield from _threads(2)


@pytest.fixture
def scratch(tmp_path):
    """tmp_path, deleted when the test ends: pytest keeps the folders of its last three runs, and the full-size
    tests write gigabytes of weights there."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)
