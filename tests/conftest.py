import os

import pytest
import torch

# Small deterministic CPU runs: one thread keeps timings irrelevant and results reproducible.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
