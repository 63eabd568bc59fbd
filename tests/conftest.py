import os

# Triton kernels run on CPU tensors through the interpreter; it must be set before any
# kernel module is imported. bench/gpu_check.sh sets it to 0 to compile for a real GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The fixture models are tiny: a second intra-op thread only adds spin-wait contention
# (10x slower steps when a test server and the test process share the 2 cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pathlib

import pytest
import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# The data beside the checkout (../shared/data); MOESTREAM_SHARED_DATA points elsewhere (a
# git worktree, a copy that travelled without it).
SHARED_DATA = pathlib.Path(os.environ.get("MOESTREAM_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
SHARED_DATA_ABSENT = (f"needs the shared data folder {SHARED_DATA} (../shared/data beside the checkout, "
                      "or MOESTREAM_SHARED_DATA), absent here")


def pick_device() -> torch.device:
    """CUDA where there is one and Triton compiles for it (TRITON_INTERPRET=0), else the CPU."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device the device-aware tests run on: the same tests exercise CUDA on a GPU machine."""
    return pick_device()


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(SHARED_DATA_ABSENT)
    return SHARED_DATA
