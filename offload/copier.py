"""Host->device copies into cache slots, and the ordering between copies and compute.

CUDA: copies run on a dedicated stream; one event per slot marks "copy done" (the compute
stream waits on it only for the slots it uses) and one marks "last use done" (the copy stream
waits on it before overwriting the slot). CPU: the "device" is host memory and a copy is a
plain synchronous memcpy, so there is nothing to order. A simulated device (`LinkCopier`)
keeps host memory as the device but copies on a thread at a given link rate, so the
asynchronous ordering and the hybrid miss policy run on machines without CUDA.
"""

import queue
import threading
import time
from collections import deque
from collections.abc import Sequence

import torch


class SyncCopier:
    """Synchronous copies (CPU, or any device without streams)."""

    is_async = False

    def __init__(self) -> None:
        self._copies: list[tuple[int, float]] = []

    def copy(self, slot: int, dst: torch.Tensor, srcs: Sequence[torch.Tensor], layer: int) -> None:
        start = time.perf_counter()
        copy_runs(dst, srcs, non_blocking=False)
        self._copies.append((layer, time.perf_counter() - start))

    def wait(self, slot: int, layer: int) -> None:
        """Nothing to wait for: the copy finished before copy() returned."""

    def release(self, slot: int) -> None:
        """Nothing to record: compute on this device is synchronous too."""

    def collect_stalls(self) -> list[tuple[int, float]]:
        """Compute never waits on its own: a synchronous copy is all stall (the cache counts it)."""
        return []

    def collect_copies(self) -> list[tuple[int, float]]:
        """(layer, seconds) of each copy since the last call."""
        copies, self._copies = self._copies, []
        return copies


class StreamCopier:
    """Non-blocking copies on a dedicated CUDA stream, ordered against compute by events."""

    is_async = True

    def __init__(self, device: torch.device, n_slots: int):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self._copied = [torch.cuda.Event() for _ in range(n_slots)]
        self._released = [torch.cuda.Event() for _ in range(n_slots)]
        # (layer, start, end) timing events not yet read back: around compute-stream waits,
        # and around each copy on the copy stream (its transfer time)
        self._waits: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []
        self._copies: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []

    def copy(self, slot: int, dst: torch.Tensor, srcs: Sequence[torch.Tensor], layer: int) -> None:
        # The slot's previous occupant may still be read by queued compute: wait for its release.
        self.stream.wait_event(self._released[slot])
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            start.record(self.stream)
            copy_runs(dst, srcs, non_blocking=True)
            end.record(self.stream)
            self._copied[slot].record(self.stream)
        self._copies.append((layer, start, end))

    def wait(self, slot: int, layer: int) -> None:
        """Make the compute stream wait for the slot's copy, timing the wait on the GPU."""
        copied = self._copied[slot]
        if copied.query():
            return
        compute = torch.cuda.current_stream(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(compute)
        compute.wait_event(copied)
        end.record(compute)
        self._waits.append((layer, start, end))

    def release(self, slot: int) -> None:
        """Mark the end of the compute queued so far on the slot (its last use until reloaded)."""
        self._released[slot].record(torch.cuda.current_stream(self.device))

    def collect_stalls(self) -> list[tuple[int, float]]:
        """(layer, seconds) of the waits the GPU has finished; never blocks."""
        done, self._waits = _finished(self._waits)
        return done

    def collect_copies(self) -> list[tuple[int, float]]:
        """(layer, seconds) of the copies the GPU has finished; never blocks."""
        done, self._copies = _finished(self._copies)
        return done


class LinkCopier:
    """A simulated host->device link: copies run one after another on a worker thread, each
    taking at least nbytes / bytes_per_s, while compute goes on (host memory is the device)."""

    is_async = True

    def __init__(self, bytes_per_s: float):
        if bytes_per_s <= 0:
            raise ValueError(f"a simulated link needs a positive rate, got {bytes_per_s}")
        self.bytes_per_s = bytes_per_s
        self._done: dict[int, threading.Event] = {}  # slot -> its latest copy's completion
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stalls: list[tuple[int, float]] = []
        self._copies: deque[tuple[int, float]] = deque()  # appended by the link thread
        self._link_free_at = 0.0  # when the link finishes the copies queued so far
        threading.Thread(target=self._run, name="moestream-sim-link", daemon=True).start()

    def copy(self, slot: int, dst: torch.Tensor, srcs: Sequence[torch.Tensor], layer: int) -> None:
        done = self._done[slot] = threading.Event()
        nbytes = sum(src.numel() for src in srcs)
        start = max(time.perf_counter(), self._link_free_at)
        self._link_free_at = start + nbytes / self.bytes_per_s
        self._queue.put((dst, srcs, self._link_free_at, done, layer))

    def _run(self) -> None:
        while True:
            dst, srcs, finish_at, done, layer = self._queue.get()
            start = time.perf_counter()
            copy_runs(dst, srcs, non_blocking=False)
            delay = finish_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            self._copies.append((layer, time.perf_counter() - start))
            done.set()

    def wait(self, slot: int, layer: int) -> None:
        done = self._done.get(slot)
        if done is None or done.is_set():
            return
        start = time.perf_counter()
        done.wait()
        self._stalls.append((layer, time.perf_counter() - start))

    def release(self, slot: int) -> None:
        """Compute on host memory is synchronous: the slot is free once compute returns."""

    def collect_stalls(self) -> list[tuple[int, float]]:
        stalls, self._stalls = self._stalls, []
        return stalls

    def collect_copies(self) -> list[tuple[int, float]]:
        """(layer, seconds on the link) of the copies finished since the last call."""
        return [self._copies.popleft() for _ in range(len(self._copies))]  # deque: thread-safe


def _finished(timed: list[tuple[int, torch.cuda.Event, torch.cuda.Event]]):
    """Split (layer, start, end) event pairs into finished (layer, seconds) and pending ones."""
    done, pending = [], []
    for item in timed:
        (done if item[2].query() else pending).append(item)
    return [(layer, start.elapsed_time(end) / 1e3) for layer, start, end in done], pending


def make_copier(device: torch.device, n_slots: int) -> SyncCopier | StreamCopier:
    return StreamCopier(device, n_slots) if device.type == "cuda" else SyncCopier()


def copy_runs(dst: torch.Tensor, srcs: Sequence[torch.Tensor], non_blocking: bool) -> None:
    """Copy the byte runs `srcs` end to end into the start of `dst`."""
    offset = 0
    for src in srcs:
        dst[offset:offset + src.numel()].copy_(src, non_blocking=non_blocking)
        offset += src.numel()
