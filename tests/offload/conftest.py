import pytest
import torch

from moestream.offload import HostExpertStore
from tests.offload.tiny_store import make_layers


@pytest.fixture
def layers() -> dict[int, tuple]:
    return make_layers()


@pytest.fixture
def store(layers) -> HostExpertStore:
    return HostExpertStore(layers, pinned=False, progress=False)


@pytest.fixture
def fake_pinning(monkeypatch):
    """Pinning needs CUDA; on CPU let torch.empty ignore pin_memory so the one-blob layout
    (the part that is ours) is still checked byte for byte."""
    if torch.cuda.is_available():
        return
    empty = torch.empty
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: empty(*a, **k))
