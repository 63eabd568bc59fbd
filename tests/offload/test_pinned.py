"""Pinned host memory of exactly the bytes held (not torch's power-of-two pinned blocks)."""

import gc
import logging

import pytest
import torch

import moestream.offload.pinned as pinned
from moestream.offload import HostExpertStore
from moestream.offload.pinned import PAGE_BYTES, HostBuffer, caching_allocator_bytes, pin_plan
from tests.offload.tiny_store import expected_bytes

# Routed expert bytes of real files: Qwen3-30B-A3B Q4_K_M and Mixtral-8x7B Q4_K_M.
REAL_EXPERT_BYTES = {"qwen3-30b-a3b": 17_550_000_000, "mixtral-8x7b": 27_300_000_000}
GIB = 1 << 30


@pytest.mark.parametrize("model", REAL_EXPERT_BYTES)
def test_plan_pins_the_expert_bytes_to_the_page(model):
    nbytes = REAL_EXPERT_BYTES[model]
    plan = pin_plan(nbytes)
    assert nbytes <= sum(size for _, size in plan) < nbytes + PAGE_BYTES
    # what torch.empty(pin_memory=True) would have pinned: 32 GiB for both
    assert caching_allocator_bytes(nbytes) == 32 * GIB


@pytest.mark.parametrize("nbytes", [0, 1, PAGE_BYTES, PAGE_BYTES + 1, 5 * PAGE_BYTES - 3, 40 * PAGE_BYTES])
def test_plan_is_contiguous_page_aligned_chunks(nbytes):
    chunk = 4 * PAGE_BYTES
    plan = pin_plan(nbytes, chunk)
    offsets = [offset for offset, _ in plan]
    assert offsets == [chunk * i for i in range(len(plan))]
    assert all(0 < size <= chunk and size % PAGE_BYTES == 0 for _, size in plan)
    assert sum(size for _, size in plan) == -(-nbytes // PAGE_BYTES) * PAGE_BYTES


def test_plan_rejects_a_chunk_that_is_not_whole_pages():
    with pytest.raises(ValueError, match="chunks of"):
        pin_plan(10, chunk_bytes=PAGE_BYTES + 1)


def test_caching_allocator_rounding():
    assert [caching_allocator_bytes(n) for n in (1, 2, 3, 4096, 4097)] == [1, 2, 4, 4096, 8192]


def test_buffer_registers_its_own_memory_once_and_releases_it(fake_pinning, monkeypatch):
    if fake_pinning is None:
        pytest.skip("checks the ranges handed to the driver; test_pinned_on_cuda checks the real thing")
    monkeypatch.setattr(pinned, "PIN_CHUNK_BYTES", 2 * PAGE_BYTES)
    nbytes = 5 * PAGE_BYTES + 7
    buffer = HostBuffer(nbytes)
    assert buffer.tensor.numel() == nbytes and not buffer.is_pinned and not fake_pinning.registered
    assert buffer.pin() == 6 * PAGE_BYTES and buffer.pin() == 6 * PAGE_BYTES
    base = buffer.tensor.data_ptr()
    assert base % PAGE_BYTES == 0
    assert fake_pinning.registered == [(base, 2 * PAGE_BYTES), (base + 2 * PAGE_BYTES, 2 * PAGE_BYTES),
                                       (base + 4 * PAGE_BYTES, 2 * PAGE_BYTES)]
    del buffer
    gc.collect()
    assert fake_pinning.unregistered == fake_pinning.registered


def test_refused_pinning_leaves_a_pageable_store(fake_pinning, monkeypatch, layers, caplog):
    if fake_pinning is None:
        pytest.skip("needs a driver that refuses")
    monkeypatch.setattr(pinned, "PIN_CHUNK_BYTES", PAGE_BYTES)
    fake_pinning.refuse_from = 2
    with caplog.at_level(logging.WARNING):
        store = HostExpertStore(layers, pinned=True, progress=False)
    assert "could not pin" in caplog.text and "--no-pin" in caplog.text
    assert fake_pinning.unregistered == fake_pinning.registered and len(fake_pinning.registered) == 2
    assert not store.is_pinned and store.pinned_bytes == 0
    (blob,) = store.blob_parts(3, 1)
    assert blob.numpy().tobytes() == expected_bytes(layers, 3, 1)


def test_pinned_store_pins_what_it_holds(fake_pinning, layers):
    store = HostExpertStore(layers, pinned=True, progress=False)
    assert store.is_pinned
    assert store.host_bytes <= store.pinned_bytes < store.host_bytes + PAGE_BYTES
    if fake_pinning is not None:
        (address, _), = fake_pinning.registered
        assert address == store.blob_parts(*store.layers[:1], 0)[0].data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_on_cuda():
    buffer = HostBuffer(3 * PAGE_BYTES + 5)
    buffer.tensor.copy_(torch.arange(buffer.tensor.numel()) % 251)
    assert buffer.pin() == 4 * PAGE_BYTES
    assert buffer.tensor.is_pinned()
    on_device = torch.empty_like(buffer.tensor, device="cuda")
    on_device.copy_(buffer.tensor, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_device.cpu(), buffer.tensor)
