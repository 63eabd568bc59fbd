"""Host memory holding every routed expert's quantized bytes, per (layer, expert).

With CUDA the bytes are copied once into ONE pinned buffer of exactly their size
(offload/pinned.py: gate | up | down of each expert contiguous) so every host->device
transfer is a single DMA-able run. Without CUDA, or
when host RAM is too tight to duplicate the file (`--no-pin`), the store is zero-copy views
into the memory-mapped GGUF arrays.
"""

import logging
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from moestream.offload.layout import ExpertLayout, ExpertWeights
from moestream.offload.pinned import HostBuffer
from moestream.offload.planner import format_bytes
from moestream.offload.source import LayerPlan
from moestream.offload.stats import CacheStats

log = logging.getLogger(__name__)

# One projection of all experts of a layer: uint8 [n_expert, bytes of one expert's part]
# (a [n_expert, rows, row_bytes] array from GGUFReader is accepted too).
ExpertArray = np.ndarray | torch.Tensor
LayerArrays = tuple[ExpertLayout, ExpertArray, ExpertArray, ExpertArray]


class HostExpertStore:
    """Every expert of every MoE layer in host memory; also the all-resident ExpertSource."""

    def __init__(self, layers: Mapping[int, LayerArrays], pinned: bool, progress: bool = True):
        if not layers:
            raise ValueError("HostExpertStore needs at least one MoE layer")
        if pinned and not torch.cuda.is_available():
            raise ValueError("pinned host memory needs CUDA; build the store with pinned=False")
        ordered = dict(sorted(layers.items()))
        self._layouts = {layer: arrays[0] for layer, arrays in ordered.items()}
        parts = {layer: _check_parts(layer, *arrays) for layer, arrays in ordered.items()}
        counts = {layer: p[0].shape[0] for layer, p in parts.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(f"layers disagree on the number of experts: {counts}")
        self.n_experts = next(iter(counts.values()))
        self._one_buffer = pinned
        self._stats = CacheStats()
        self._buffer: HostBuffer | None = None
        self._parts: dict[int, tuple[torch.Tensor, ...]] = {} if pinned else parts
        self._blobs: dict[int, torch.Tensor] = {}
        if pinned:
            # filled first, pinned after: the fill faults every page in, then one pass locks them
            start_s = time.perf_counter()
            log.info("pinning %s of routed experts in host memory", format_bytes(self.host_bytes_needed))
            self._buffer = HostBuffer(self.host_bytes_needed)
            self._fill_pinned(self._buffer.tensor, parts, progress)
            self._buffer.pin()
            log.info("experts pinned in %.1f s", time.perf_counter() - start_s)

    def _fill_pinned(self, pinned: torch.Tensor, parts: dict[int, tuple[torch.Tensor, ...]],
                     progress: bool) -> None:
        """Copy every layer into `pinned`, keeping per-layer views [n_expert, expert_bytes]."""
        base = 0
        with tqdm(total=self.host_bytes_needed, unit="B", unit_scale=True, desc="pinning experts",
                  disable=not progress) as bar:
            for layer, layout in self._layouts.items():
                size = self.n_experts * layout.expert_bytes
                blob = pinned[base:base + size].view(self.n_experts, layout.expert_bytes)
                starts = layout.offsets + (layout.expert_bytes,)
                for part, begin, end in zip(parts[layer], starts, starts[1:]):
                    blob[:, begin:end].copy_(part)
                    bar.update(part.numel())
                self._blobs[layer] = blob
                base += size

    @property
    def host_bytes_needed(self) -> int:
        """Bytes of all experts of all layers (what pinning allocates)."""
        return sum(self.n_experts * layout.expert_bytes for layout in self._layouts.values())

    @property
    def host_bytes(self) -> int:
        """Bytes this store allocated (0 when it only views the memory-mapped file)."""
        return 0 if self._buffer is None else self._buffer.tensor.numel()

    @property
    def pinned_bytes(self) -> int:
        """Bytes page-locked for DMA: host_bytes rounded up to a page, or 0."""
        return 0 if self._buffer is None else self._buffer.pinned_bytes

    @property
    def is_pinned(self) -> bool:
        return self.pinned_bytes > 0

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self._layouts)

    @property
    def n_layers(self) -> int:
        return len(self._layouts)

    @property
    def max_expert_bytes(self) -> int:
        return max(layout.expert_bytes for layout in self._layouts.values())

    def layout(self, layer: int) -> ExpertLayout:
        return self._layouts[layer]

    def weights(self, layer: int, expert: int) -> ExpertWeights:
        """Host views of one expert's projections (no copy)."""
        if self._one_buffer:
            return ExpertWeights.from_blob(self._layouts[layer], self._blobs[layer][expert])
        gate, up, down = (part[expert] for part in self._parts[layer])
        return ExpertWeights(self._layouts[layer], gate, up, down)

    def part_arrays(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """gate, up, down of every expert of `layer`, uint8 [n_expert, bytes] views of the
        file's pages; None when pinned (the experts then live in one blob per expert)."""
        return None if self._one_buffer else self._parts[layer]

    def count_lookups(self, ids: torch.Tensor) -> None:
        """Count one step's routing [n_layers, k] (the compiled decode, which reads experts
        here without `load`): every distinct expert of a layer is one lookup and one hit."""
        for layer, row in zip(self._layouts, ids.tolist()):
            n = len(set(row))
            self._stats.add(layer, expert_lookups=n, expert_hits=n)

    def blob_parts(self, layer: int, expert: int) -> tuple[torch.Tensor, ...]:
        """The runs to copy, in slot order: the whole blob when pinned, else gate, up, down."""
        if self._one_buffer:
            return (self._blobs[layer][expert],)
        return tuple(part[expert] for part in self._parts[layer])

    # ExpertSource: everything is resident, so every lookup is a hit and nothing is copied.
    def plan(self, layer: int, tokens: Mapping[int, int]) -> LayerPlan:
        return LayerPlan(device=tuple(tokens))

    def record_cpu(self, layer: int, tokens: Mapping[int, int], seconds: float) -> None:
        """Never called: a host store's plan puts nothing on a separate CPU side."""

    def load(self, layer: int, expert_ids: Sequence[int]) -> Iterator[tuple[int, ExpertWeights]]:
        ids = list(dict.fromkeys(int(e) for e in expert_ids))
        self._stats.add(layer, expert_lookups=len(ids), expert_hits=len(ids))
        for expert in ids:
            yield expert, self.weights(layer, expert)

    def prefetch(self, layer: int, expert_ids: Sequence[int]) -> None:
        """Nothing to do: every expert is already where compute reads it."""

    def stats(self) -> dict:
        return self._stats.as_dict(
            n_slots=self.n_layers * self.n_experts, slot_bytes=self.max_expert_bytes
        )


def _check_parts(layer: int, layout: ExpertLayout,
                 *arrays: ExpertArray) -> tuple[torch.Tensor, ...]:
    """uint8 [n_expert, part bytes] tensors sharing memory with `arrays`, checked against layout."""
    parts = []
    projections = (layout.gate, layout.up, layout.down)
    for name, proj, array in zip(("gate", "up", "down"), projections, arrays):
        tensor = _as_tensor(array)
        tensor = tensor.reshape(tensor.shape[0], -1)
        if tensor.dtype != torch.uint8 or tensor.shape[1] != proj.nbytes:
            raise ValueError(
                f"layer {layer} {name}: expected uint8 [n_expert, {proj.nbytes}], "
                f"got {tensor.dtype} {tuple(tensor.shape)}"
            )
        parts.append(tensor)
    return tuple(parts)


def _as_tensor(array: ExpertArray) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array
    with warnings.catch_warnings():
        # GGUFReader's memmaps are read-only; we only ever read through these views.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)
