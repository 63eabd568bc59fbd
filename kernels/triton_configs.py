"""Tile configs of the Triton kernels per GPU compute capability, as data.

One table keyed by (capability, kernel kind, row tile) holds the config every type uses,
and a second one the few (capability, kind, row tile, type) entries whose decoders need
their own. Every capability's selected configs are compiled by ptxas, with no spill stores
or loads and no stack frame allowed (a spilling tile reads local memory inside the decode
loop): for every type by `python -m bench.kernels_compile`, for the heaviest decoders by
tests/kernels/test_triton_compile.py in the suite. A capability not in the table takes the nearest one below it, with a logged
warning (sm_75 for anything older). Tune with `python -m bench.kernels` on the target GPU.

Why the entries differ: sm_90's are the first guesses read from sm_90 builds. On Turing
(sm_75) the same tensor-core tiles need about twice the registers (16 x 64 x 64 at 4 warps:
255 registers and 424 bytes of stack, against 123 on sm_80), so its GEMM and grouped tiles
hold 16 dequantized weights per thread (64 x 32 at 4 warps, 64 x 64 x 32 at 8).
"""

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from gguf import GGMLQuantizationType as Q

# The block types the Triton decoders read (kernels/triton_dequant_tiles.py); kept here, in a
# module that does not import triton, so that CPU-only installs can ask about them.
TRITON_QTYPES: frozenset[Q] = frozenset(
    {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.IQ4_NL, Q.Q2_K, Q.Q3_K, Q.Q4_K,
     Q.Q5_K, Q.Q6_K, Q.IQ4_XS, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ1_S, Q.IQ1_M, Q.MXFP4}
)

log = logging.getLogger(__name__)

Kind = Literal["gemv", "gemm", "grouped"]
KINDS: tuple[Kind, ...] = ("gemv", "gemm", "grouped")


@dataclass(frozen=True)
class TileConfig:
    block_n: int  # weight rows per program (GEMV: at one activation row, halved per doubling)
    block_k: int  # columns per step: 32, 64, 128 or 256
    num_warps: int
    num_stages: int = 2


# Row tiles with their own entries: GEMV programs are sized at one activation row; GEMM
# and grouped programs take 16 rows (decode batches) or 32-64 rows (prefill, full experts).
ROW_TILES: dict[Kind, tuple[int, ...]] = {"gemv": (1,), "gemm": (16, 64), "grouped": (16, 64)}

_GEMV = TileConfig(block_n=16, block_k=128, num_warps=4, num_stages=1)
_SM90 = {
    ("gemv", 1): _GEMV,
    ("gemm", 16): TileConfig(block_n=64, block_k=64, num_warps=4),
    ("gemm", 64): TileConfig(block_n=128, block_k=64, num_warps=8),
    ("grouped", 16): TileConfig(block_n=64, block_k=64, num_warps=4),
    ("grouped", 64): TileConfig(block_n=64, block_k=128, num_warps=8),
}
# Ampere, Ada and consumer Blackwell (sm_120, no Hopper wgmma) keep the tensor-core
# accumulators in registers too: sm_90's 64-row grouped tile needs 244-253 of the 255
# registers there (ptxas 12.9/13.4), so it takes half the K step.
_SM80 = _SM90 | {("grouped", 64): TileConfig(block_n=64, block_k=64, num_warps=8)}
_SM75 = {
    ("gemv", 1): _GEMV,
    ("gemm", 16): TileConfig(block_n=64, block_k=32, num_warps=4),
    ("gemm", 64): TileConfig(block_n=64, block_k=32, num_warps=8),
    ("grouped", 16): TileConfig(block_n=64, block_k=32, num_warps=4),
    ("grouped", 64): TileConfig(block_n=64, block_k=32, num_warps=8),
}

# (capability major*10 + minor, kind, row tile) -> the config of every type without an
# entry in BY_TYPE.
DEFAULT: dict[tuple[int, Kind, int], TileConfig] = {
    (sm, kind, rows): config
    for sm, table in ((75, _SM75), (80, _SM80), (86, _SM80), (89, _SM80), (90, _SM90), (120, _SM80))
    for (kind, rows), config in table.items()
}
# (capability, kind, row tile, type) -> a config for one decoder that the default does not
# fit. On sm_120 ptxas 13.4 builds the IQ3 grid decoders' 16-row grouped kernel at 4 warps
# in 128 registers plus 8-16 bytes of spills; at 8 warps they fit (102-122 registers).
BY_TYPE: dict[tuple[int, Kind, int, Q], TileConfig] = {
    (120, "grouped", 16, qtype): TileConfig(block_n=64, block_k=64, num_warps=8) for qtype in (Q.IQ3_S, Q.IQ3_XXS)
}
CAPABILITIES: tuple[int, ...] = tuple(sorted({sm for sm, _, _ in DEFAULT}))


def row_tile(kind: Kind, block_m: int) -> int:
    """The row tile whose entry serves a program of `block_m` activation rows."""
    if kind == "gemv":
        return 1
    return 16 if block_m <= 16 else 64


def tile_config(capability: int, kind: Kind, block_m: int, qtype: Q) -> TileConfig:
    """The checked config for `kind` with `block_m` rows of `qtype` on sm_`capability`."""
    key = (table_capability(capability), kind, row_tile(kind, block_m))
    return BY_TYPE.get((*key, qtype), DEFAULT[key])


@lru_cache(maxsize=None)
def table_capability(capability: int) -> int:
    """`capability` if the table has it, else the nearest one below it (logged once)."""
    if capability in CAPABILITIES:
        return capability
    chosen = max((sm for sm in CAPABILITIES if sm <= capability), default=CAPABILITIES[0])
    log.warning(
        "no Triton kernel configs checked for sm_%d; using sm_%d's (check them with "
        "`python -m bench.kernels_compile --arch %d`)", capability, chosen, capability,
    )
    return chosen


def device_capability(major_minor: tuple[int, int]) -> int:
    """torch.cuda.get_device_capability's (major, minor) as the table's major*10 + minor."""
    major, minor = major_minor
    return 10 * major + minor
