import os

# Triton reads this when a kernel is defined (@triton.jit), so it must be set before any
# chronicals module is imported. The tests run every kernel on CPU through the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

# Under pytest-xdist (the README's `-n auto`) the workers share the cores: one worker's ops use
# its share of them, not all, so that workers do not slow each other down.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most four (each holds torch, transformers and Inductor:
    1-2 GiB of memory)."""
    return min(os.cpu_count() or 1, 4)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run on the GPU machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


