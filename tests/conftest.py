import os

import pytest

try:  # the ONNX and CLI tests also run in an environment without torch
    import torch
except ImportError:  # pragma: no cover - the torch-free run
    torch = None

if torch is not None:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    if torch is not None:
        torch.manual_seed(0)
