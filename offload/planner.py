"""VRAM budget -> placement: what stays resident, and how many expert slots the rest buys."""

import logging
import math
import re
from dataclasses import dataclass

import torch

from moestream.kernels.errors import MoestreamError

log = logging.getLogger(__name__)

_UNITS = {
    "": 1, "b": 1,
    "k": 2**10, "kib": 2**10, "kb": 10**3,
    "m": 2**20, "mib": 2**20, "mb": 10**6,
    "g": 2**30, "gib": 2**30, "gb": 10**9,
    "t": 2**40, "tib": 2**40, "tb": 10**12,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")
_ACCEPTED = (
    "a number of bytes, or a number with a unit: 512MiB, 1.5GiB, 6GB, 64M "
    "(KiB/MiB/GiB/TiB and K/M/G/T are powers of 1024; KB/MB/GB/TB are powers of 1000)"
)
# CUDA memory kept out of the default budget: the allocator's fragmentation, cuBLAS and
# Triton workspaces and other processes' growth; the larger of the two.
_MARGIN_BYTES = 512 * 2**20
_MARGIN_FRACTION = 0.05


def parse_bytes(size: str | int) -> int:
    """'1GiB' | '6GB' | '512MiB' | '64M' | 1234 -> bytes."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 0:
            raise MoestreamError(f"size {size} is negative: give {_ACCEPTED}")
        return size
    match = _SIZE.fullmatch(size) if isinstance(size, str) else None
    if match is None or match.group(2).lower() not in _UNITS:
        raise MoestreamError(f"cannot read {size!r} as a size: give {_ACCEPTED}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(n: int) -> str:
    """Bytes in binary units, 3 significant digits or so: '1.50 GiB', '512.00 MiB'."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


class BudgetTooSmall(MoestreamError):
    """The VRAM budget does not hold the resident weights, the KV cache and one expert slot."""


@dataclass(frozen=True)
class PlacementPlan:
    budget_bytes: int
    resident_bytes: int  # attention, router, norms, embeddings, lm_head, shared experts
    kv_bytes: int
    workspace_bytes: int  # activations and kernel scratch at the largest batch
    slot_bytes: int  # one expert: gate + up + down, quantized
    n_slots: int
    n_experts_total: int  # routed experts over all MoE layers
    min_budget_bytes: int  # everything fixed plus one slot

    @property
    def cache_bytes(self) -> int:
        return self.n_slots * self.slot_bytes

    @property
    def used_bytes(self) -> int:
        return self.resident_bytes + self.kv_bytes + self.workspace_bytes + self.cache_bytes

    @property
    def is_all_resident(self) -> bool:
        return self.n_slots == self.n_experts_total

    def __str__(self) -> str:
        share = f"{self.n_slots} of {self.n_experts_total} experts, " \
                f"{100 * self.n_slots / self.n_experts_total:.1f}%"
        rows = [
            ("VRAM budget", self.budget_bytes, ""),
            ("resident weights", self.resident_bytes, "attention, router, norms, shared experts"),
            ("KV cache", self.kv_bytes, ""),
            ("workspace", self.workspace_bytes, ""),
            ("expert cache", self.cache_bytes,
             f"{self.n_slots} slots x {format_bytes(self.slot_bytes)} ({share})"),
            ("unused", self.budget_bytes - self.used_bytes, ""),
            ("minimum budget", self.min_budget_bytes, "fixed parts + one expert slot"),
        ]
        lines = ["placement plan"]
        lines += [f"  {name:<18}{format_bytes(n):>12}  {note}".rstrip() for name, n, note in rows]
        return "\n".join(lines)


def plan_placement(budget_bytes: int, resident_bytes: int, kv_bytes: int, workspace_bytes: int,
                   slot_bytes: int, n_experts_total: int,
                   max_cached_experts: int | None = None) -> PlacementPlan:
    """As many expert slots as fit after the fixed parts, capped by the expert count and
    `max_cached_experts`; raises BudgetTooSmall when not even one slot fits."""
    if max_cached_experts is not None and max_cached_experts < 1:
        raise MoestreamError(f"max cached experts must be at least 1, got {max_cached_experts}")
    fixed = resident_bytes + kv_bytes + workspace_bytes
    min_budget = fixed + slot_bytes
    if budget_bytes < min_budget:
        raise BudgetTooSmall(
            f"VRAM budget {format_bytes(budget_bytes)} is too small: resident weights "
            f"{format_bytes(resident_bytes)} + KV cache {format_bytes(kv_bytes)} + workspace "
            f"{format_bytes(workspace_bytes)} + one expert slot {format_bytes(slot_bytes)} need "
            f"at least {format_bytes(min_budget)} ({min_budget} bytes). Raise --vram-budget to "
            f"at least that, or shrink the KV cache: a smaller --ctx-size, a smaller --max-batch "
            f"or a smaller KV cache type."
        )
    n_slots = min(n_experts_total, (budget_bytes - fixed) // slot_bytes)
    if max_cached_experts is not None:
        n_slots = min(n_slots, max_cached_experts)
    return PlacementPlan(budget_bytes, resident_bytes, kv_bytes, workspace_bytes, slot_bytes,
                         n_slots, n_experts_total, min_budget)


def default_budget(device: torch.device | str) -> int | None:
    """Free CUDA memory minus a safety margin; None on CPU, meaning "everything resident"."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    margin = max(_MARGIN_BYTES, int(_MARGIN_FRACTION * total))
    log.info("CUDA %s: %s free of %s; default VRAM budget keeps %s spare", device,
             format_bytes(free), format_bytes(total), format_bytes(margin))
    return max(0, free - margin)


def kv_cache_bytes(n_layers: int, n_kv_heads: int, head_dim: int, n_tokens: int,
                   dtype_bytes: float) -> int:
    """K and V for `n_tokens` positions; dtype_bytes may be fractional (q8_0: 34/32)."""
    return math.ceil(2 * n_layers * n_kv_heads * head_dim * n_tokens * dtype_bytes)
