"""A model file larger than the host's RAM + swap opens: the loader maps it read-only. A
copy-on-write map is charged against the commit limit in full, and under Linux's default
overcommit opening GLM-4.5-Air's 72 GB on a 24 GiB host failed with ENOMEM."""

from __future__ import annotations

from pathlib import Path

import pytest

from moestream.engine.loader import open_gguf
from moestream.tools.synth import get_preset, write_synthetic


def _ram_and_swap_bytes() -> int:
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return sum(int(fields[k].split()[0]) * 1024 for k in ("MemTotal", "SwapTotal"))


def test_a_file_larger_than_ram_and_swap_opens(tmp_path: Path) -> None:
    path = tmp_path / "glm-4.5-air.gguf"
    write_synthetic(path, get_preset("glm4moe", "glm-4.5-air"), "Q4_K_M", random_weights=False, progress=False)
    if path.stat().st_size <= _ram_and_swap_bytes():
        pytest.skip("this host has more RAM + swap than the 72 GB file: nothing to show")
    file = open_gguf(path)  # a sparse file: its data are zeros and cost no disk
    assert file.config.arch == "glm4moe" and file.config.n_layers == 46
    embd = file.tensor("token_embd.weight")
    assert embd.data.shape[0] == embd.dims[0] and not embd.data.any()
