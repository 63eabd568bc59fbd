"""The per-capability config table: complete, legal, and picked with a logged fallback."""

import logging

import pytest
from gguf import GGMLQuantizationType as Q

from moestream.kernels import triton_configs as tc
from moestream.kernels.triton_configs import TRITON_QTYPES
from moestream.kernels.triton_gemm import gpu_gemm_config
from moestream.kernels.triton_gemv import gpu_gemv_config
from moestream.kernels.triton_moe import gpu_grouped_config

CAPABILITIES = (75, 80, 86, 89, 90, 120)  # T4/RTX 20xx, A100, RTX 30xx, RTX 40xx/L4, H100/H200, RTX 50xx


def test_every_capability_kind_and_row_tile_has_a_legal_entry() -> None:
    assert tc.CAPABILITIES == CAPABILITIES
    for sm in CAPABILITIES:
        for kind in tc.KINDS:
            for rows in tc.ROW_TILES[kind]:
                for qtype in TRITON_QTYPES:
                    c = tc.tile_config(sm, kind, rows, qtype)
                    assert c.block_k in (32, 64, 128, 256) and c.num_warps in (1, 2, 4, 8, 16), (sm, kind, c)
                    assert c.block_n >= 2 and c.block_n & (c.block_n - 1) == 0, (sm, kind, c)


def test_type_entries_override_the_default(monkeypatch) -> None:
    narrow = tc.TileConfig(block_n=128, block_k=32, num_warps=8)
    monkeypatch.setitem(tc.BY_TYPE, (80, "gemm", 64, Q.F32), narrow)
    assert tc.tile_config(80, "gemm", 64, Q.F32) == narrow != tc.DEFAULT[(80, "gemm", 64)]
    assert tc.tile_config(80, "gemm", 64, Q.Q4_K) == tc.DEFAULT[(80, "gemm", 64)]
    assert tc.tile_config(86, "gemm", 64, Q.F32) == tc.DEFAULT[(86, "gemm", 64)]


@pytest.mark.parametrize("block_m, rows", [(16, 16), (32, 64), (64, 64)])
def test_row_tiles(block_m: int, rows: int) -> None:
    assert tc.row_tile("gemm", block_m) == rows and tc.row_tile("gemv", block_m // 16) == 1


def test_launchers_take_the_capabilitys_tiles() -> None:
    """sm_75 gets its narrow tensor-core tiles, sm_90 its own; the launchers do not mix them up."""
    for sm in (75, 90):
        gemm, grouped = gpu_gemm_config(64, Q.Q5_0, sm), gpu_grouped_config(16, Q.Q5_0, sm)
        assert (gemm.block_n, gemm.block_k, gemm.num_warps) == _fields(tc.DEFAULT[(sm, "gemm", 64)])
        assert (grouped.block_n, grouped.block_k, grouped.num_warps) == _fields(tc.DEFAULT[(sm, "grouped", 16)])
    assert gpu_gemm_config(16, Q.Q4_K, 75).block_k == 32 and gpu_gemm_config(16, Q.Q4_K, 90).block_k == 64
    gemv = gpu_gemv_config(4, 4096, 4096, Q.Q4_K, n_sm=40, capability=75)
    assert gemv.block_m == 4 and gemv.block_n == tc.DEFAULT[(75, "gemv", 1)].block_n // 4


def _fields(c: tc.TileConfig) -> tuple[int, int, int]:
    return c.block_n, c.block_k, c.num_warps


@pytest.mark.parametrize("capability, used", [(121, 120), (100, 90), (87, 86), (70, 75), (61, 75)])
def test_unknown_capability_takes_the_nearest_below_with_one_warning(capability, used, caplog) -> None:
    tc.table_capability.cache_clear()
    with caplog.at_level(logging.WARNING, logger="moestream.kernels.triton_configs"):
        for _ in range(2):
            assert tc.tile_config(capability, "grouped", 16, Q.Q4_K) == tc.DEFAULT[(used, "grouped", 16)]
    assert len(caplog.records) == 1
    assert f"sm_{capability}" in caplog.records[0].getMessage() and f"sm_{used}'s" in caplog.records[0].getMessage()


def test_known_capability_logs_nothing(caplog) -> None:
    tc.table_capability.cache_clear()
    with caplog.at_level(logging.WARNING, logger="moestream.kernels.triton_configs"):
        tc.tile_config(89, "gemv", 1, Q.Q6_K)
    assert not caplog.records
    assert tc.device_capability((8, 9)) == 89 and tc.device_capability((12, 0)) == 120
