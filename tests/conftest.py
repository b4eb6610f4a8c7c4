import os
import shutil
import uuid

import pytest
import torch

# Small, deterministic thread counts keep the suite stable on 2-core CI machines.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def shm_dir(monkeypatch):
    """A shared-memory directory of this test's own (STAGER_SHM_DIR), removed with every segment
    in it whatever the test's outcome."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"
    path = os.path.join(base, f"stager-test-{uuid.uuid4().hex[:12]}")
    os.makedirs(path)
    monkeypatch.setenv("STAGER_SHM_DIR", path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
