import os

# Triton kernels run on CPU tensors through the interpreter; it must be set before any
# kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The fixture models are tiny: a second intra-op thread only adds spin-wait contention
# (10x slower steps when a test server and the test process share the 2 cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    assert SHARED_DATA.is_dir(), f"shared data not found at {SHARED_DATA}"
    return SHARED_DATA
