"""Host memory of an exact size, page-locked for DMA when CUDA is there.

`torch.empty(n, pin_memory=True)` goes through torch's caching host allocator, which rounds
every block up to a power of two: 17.55 GB of Qwen3-30B-A3B Q4_K_M experts would pin 32 GiB,
starving a 32 GB desktop. Instead the buffer is anonymous memory of exactly the size asked
(rounded up to a page), registered with `cudaHostRegister` in chunks: pinned bytes = held
bytes. Without CUDA the same buffer, unpinned, is plain pageable memory.
"""

from __future__ import annotations

import logging
import mmap
import weakref

import torch

log = logging.getLogger(__name__)

PAGE_BYTES = mmap.PAGESIZE
# Registering 1 GiB at a time keeps each call short (the driver locks every page of the
# range) and lets a failure name the chunk it happened in.
PIN_CHUNK_BYTES = 1 << 30


def pin_plan(nbytes: int, chunk_bytes: int = PIN_CHUNK_BYTES, page_bytes: int = PAGE_BYTES) -> list[tuple[int, int]]:
    """(offset, bytes) of each registration covering `nbytes` rounded up to whole pages:
    contiguous, page-aligned, each at most `chunk_bytes` (a multiple of the page)."""
    if nbytes < 0 or chunk_bytes <= 0 or chunk_bytes % page_bytes:
        raise ValueError(f"bad pin plan: {nbytes} bytes in chunks of {chunk_bytes} (page {page_bytes})")
    total = -(-nbytes // page_bytes) * page_bytes
    return [(offset, min(chunk_bytes, total - offset)) for offset in range(0, total, chunk_bytes)]


def caching_allocator_bytes(nbytes: int) -> int:
    """What `torch.empty(nbytes, pin_memory=True)` pins: the next power of two."""
    return 1 << max(nbytes - 1, 0).bit_length()


def cuda_register(address: int, nbytes: int) -> None:
    _check(torch.cuda.cudart().cudaHostRegister(address, nbytes, 0), "cudaHostRegister", nbytes)


def cuda_unregister(address: int, nbytes: int) -> None:
    _check(torch.cuda.cudart().cudaHostUnregister(address), "cudaHostUnregister", nbytes)


def _check(status, call: str, nbytes: int) -> None:
    code = int(status)
    if code != 0:
        message = torch.cuda.cudart().cudaGetErrorString(status)
        raise RuntimeError(f"{call} of {nbytes} bytes failed: {message} (cudaError {code})")


class HostBuffer:
    """`nbytes` of zeroed pageable host memory as a uint8 tensor, which `pin()` page-locks."""

    def __init__(self, nbytes: int):
        self._plan = pin_plan(nbytes, PIN_CHUNK_BYTES)
        self._map = mmap.mmap(-1, max(sum(size for _, size in self._plan), PAGE_BYTES))
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)[:nbytes]
        self.pinned_bytes = 0

    def pin(self) -> int:
        """Page-lock the whole buffer, all or nothing: if the driver refuses a chunk, the chunks
        done are released and the buffer stays pageable, with a warning (copies still work from
        it, only slower). Returns the bytes pinned."""
        if self.pinned_bytes or not self._plan:
            return self.pinned_bytes
        base = self.tensor.data_ptr()
        done: list[tuple[int, int]] = []
        try:
            for offset, size in self._plan:
                cuda_register(base + offset, size)
                done.append((base + offset, size))
        except (RuntimeError, AttributeError) as error:  # AttributeError: a torch without the binding
            _release(done)
            log.warning("could not pin %d bytes of host memory (%s): expert copies run from pageable "
                        "memory, slower; `--no-pin` skips the attempt", self._plan[-1][0] + self._plan[-1][1],
                        error)
            return 0
        # Unpinned when the buffer goes; the finalizer holds the mapping so that it outlives the
        # unpinning. Not at exit: the process frees everything and CUDA may be gone by then.
        weakref.finalize(self, _release, done, self._map).atexit = False
        self.pinned_bytes = sum(size for _, size in done)
        return self.pinned_bytes

    @property
    def is_pinned(self) -> bool:
        return self.pinned_bytes > 0


def _release(ranges: list[tuple[int, int]], *keep_alive: object) -> None:
    for address, size in ranges:
        cuda_unregister(address, size)
