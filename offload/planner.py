"""VRAM budget -> placement: what stays resident, and how many expert slots the rest buys."""

import logging
import math
import re
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


def too_small_advice(budget_bytes: int, resident_bytes: int, kv_bytes: int, workspace_bytes: int,
                     slot_bytes: int) -> str:
    """Why a budget does not hold the fixed parts and one slot, and which flags change that."""
    min_budget = resident_bytes + kv_bytes + workspace_bytes + slot_bytes
    return (f"VRAM budget {format_bytes(budget_bytes)} is too small: resident weights "
            f"{format_bytes(resident_bytes)} + KV cache {format_bytes(kv_bytes)} + workspace "
            f"{format_bytes(workspace_bytes)} + one expert slot {format_bytes(slot_bytes)} need "
            f"at least {format_bytes(min_budget)} ({min_budget} bytes). Raise --vram-budget to "
            f"at least that, or shrink the KV cache: fewer tokens with --kv-tokens or --ctx-size, "
            f"or 2-byte elements with --kv-dtype f16.")


def fit_slots(budget_bytes: int, fixed_bytes: int, slot_bytes: int, n_experts_total: int,
              max_cached_experts: int | None = None) -> int:
    """Expert slots that fit after the fixed parts, capped by the expert count and
    `max_cached_experts`; 0 when not even one fits."""
    if max_cached_experts is not None and max_cached_experts < 1:
        raise MoestreamError(f"max cached experts must be at least 1, got {max_cached_experts}")
    n_slots = min(n_experts_total, max(0, budget_bytes - fixed_bytes) // slot_bytes)
    if max_cached_experts is not None:
        n_slots = min(n_slots, max_cached_experts)
    return n_slots


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


# Free device memory to keep after a measurement: below this, the next longer prompt's
# activations would meet an out-of-memory error instead of a smaller cache.
MIN_FREE_BYTES = 64 * 2**20


def slots_after_measurement(n_slots: int, slot_bytes: int, reserved_bytes: int, budget_bytes: int,
                            free_bytes: int) -> int:
    """Slots to keep once the allocator's peak reservation and the device's free memory are
    measured: every slot whose bytes the process is over budget by (or short of
    MIN_FREE_BYTES free) goes, down to one slot."""
    shortage = max(reserved_bytes - budget_bytes, MIN_FREE_BYTES - free_bytes, 0)
    return max(1, n_slots - math.ceil(shortage / slot_bytes))
