from dataclasses import dataclass, field

import pytest
import torch

import moestream.offload.pinned as pinned

from moestream.offload import HostExpertStore
from tests.offload.tiny_store import make_layers


@pytest.fixture
def layers() -> dict[int, tuple]:
    return make_layers()


@pytest.fixture
def store(layers) -> HostExpertStore:
    return HostExpertStore(layers, pinned=False, progress=False)


@dataclass
class Registrations:
    registered: list[tuple[int, int]] = field(default_factory=list)
    unregistered: list[tuple[int, int]] = field(default_factory=list)
    refuse_from: int | None = None  # refuse the nth registration on (0-based)

    def register(self, address: int, nbytes: int) -> None:
        if self.refuse_from is not None and len(self.registered) >= self.refuse_from:
            raise RuntimeError("cudaHostRegister of %d bytes failed: out of memory (cudaError 2)" % nbytes)
        self.registered.append((address, nbytes))

    def unregister(self, address: int, nbytes: int) -> None:
        self.unregistered.append((address, nbytes))


@pytest.fixture
def fake_pinning(monkeypatch) -> Registrations | None:
    """Pinning needs CUDA; on CPU the driver's cudaHostRegister is replaced by a recorder, so
    the one-blob layout and the ranges pinned (the parts that are ours) are still checked.
    With CUDA the real driver pins, and the fixture gives None."""
    if torch.cuda.is_available():
        return None
    calls = Registrations()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pinned, "cuda_register", calls.register)
    monkeypatch.setattr(pinned, "cuda_unregister", calls.unregister)
    return calls
