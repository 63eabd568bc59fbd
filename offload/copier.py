"""Host->device copies into cache slots, and the ordering between copies and compute.

CUDA: copies run on a dedicated stream; one event per slot marks "copy done" (the compute
stream waits on it only for the slots it uses) and one marks "last use done" (the copy stream
waits on it before overwriting the slot). CPU: the "device" is host memory and a copy is a
plain synchronous memcpy, so there is nothing to order.
"""

from collections.abc import Sequence

import torch


class SyncCopier:
    """Synchronous copies (CPU, or any device without streams)."""

    is_async = False

    def copy(self, slot: int, dst: torch.Tensor, srcs: Sequence[torch.Tensor]) -> None:
        _copy_runs(dst, srcs, non_blocking=False)

    def wait(self, slot: int, layer: int) -> None:
        """Nothing to wait for: the copy finished before copy() returned."""

    def release(self, slot: int) -> None:
        """Nothing to record: compute on this device is synchronous too."""

    def collect_stalls(self) -> list[tuple[int, float]]:
        return []


class StreamCopier:
    """Non-blocking copies on a dedicated CUDA stream, ordered against compute by events."""

    is_async = True

    def __init__(self, device: torch.device, n_slots: int):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self._copied = [torch.cuda.Event() for _ in range(n_slots)]
        self._released = [torch.cuda.Event() for _ in range(n_slots)]
        # (layer, start, end) timing events around compute-stream waits not yet read back
        self._waits: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []

    def copy(self, slot: int, dst: torch.Tensor, srcs: Sequence[torch.Tensor]) -> None:
        # The slot's previous occupant may still be read by queued compute: wait for its release.
        self.stream.wait_event(self._released[slot])
        with torch.cuda.stream(self.stream):
            _copy_runs(dst, srcs, non_blocking=True)
            self._copied[slot].record(self.stream)

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
        done, pending = [], []
        for wait in self._waits:
            (done if wait[2].query() else pending).append(wait)
        self._waits = pending
        return [(layer, start.elapsed_time(end) / 1e3) for layer, start, end in done]


def make_copier(device: torch.device, n_slots: int) -> SyncCopier | StreamCopier:
    return StreamCopier(device, n_slots) if device.type == "cuda" else SyncCopier()


def _copy_runs(dst: torch.Tensor, srcs: Sequence[torch.Tensor], non_blocking: bool) -> None:
    """Copy the byte runs `srcs` end to end into the start of `dst`."""
    offset = 0
    for src in srcs:
        dst[offset:offset + src.numel()].copy_(src, non_blocking=non_blocking)
        offset += src.numel()
