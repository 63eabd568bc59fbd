"""Bit-field unpacking shared by the torch reference dequantizers."""

import torch


def unpack(packed: torch.Tensor, group: int, bits: int, count: int) -> torch.Tensor:
    """Split packed integers into `bits`-wide fields, lowest bits first.

    packed [n, k] -> [n, k * count]: each run of `group` values yields `count` runs of
    `group` fields, the i-th run holding bits [i*bits, (i+1)*bits) of every value. This is
    the GGML convention (e.g. Q4_0: 16 bytes -> 16 low nibbles, then 16 high nibbles).
    """
    n = packed.shape[0]
    shifts = torch.arange(0, bits * count, bits, dtype=packed.dtype, device=packed.device)
    fields = (packed.reshape(n, -1, 1, group) >> shifts.view(1, 1, count, 1)) & ((1 << bits) - 1)
    return fields.reshape(n, -1)


def sign_bits(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [n, k] -> float32 [n, k * 8]: +1 where a bit is clear, -1 where set, bit 0 first."""
    return 1.0 - 2.0 * unpack(packed, 1, 1, 8).float()
