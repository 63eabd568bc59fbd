"""engine/page_cache.py: the model file's page cache in 2 MiB folios (decode reads weights
~20% faster through them on the CPU; docs/PERFORMANCE.md, "Huge pages")."""

import logging
import os

import numpy as np
import pytest

from moestream.engine import page_cache

SMAPS = """\
7f0000000000-7f0000400000 r--s 00000000 fd:01 123 /models/a.gguf
Size:               4096 kB
FilePmdMapped:      2048 kB
7f0000600000-7f0000a00000 r--s 00000000 fd:01 124 /models/b.gguf
Size:               4096 kB
FilePmdMapped:         0 kB
"""


def test_reads_the_pmd_mapped_bytes_of_each_mapping():
    assert page_cache.pmd_mapped(SMAPS.splitlines(keepends=True)) == {0x7F0000000000: 2048 * 1024,
                                                                    0x7F0000600000: 0}


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 8 * page_cache.HUGE_PAGE, dtype=np.uint8).tobytes())
    return path


def _spy(monkeypatch, rounds):
    """chunk_shares returns the shares of `rounds` in turn (one list per call, over the chunks
    it is given); returns the posix_fadvise calls made, (offset, length, advice)."""
    given = []
    it = iter(rounds)

    def shares(path, chunks=None):
        size = path.stat().st_size
        chunks = chunks or [(off, min(page_cache.CHUNK, size - off)) for off in range(0, size, page_cache.CHUNK)]
        return [(off, length, s) for (off, length), s in zip(chunks, next(it), strict=True)]

    monkeypatch.setattr(page_cache, "chunk_shares", shares)
    monkeypatch.setattr(page_cache, "CHUNK", 4 * page_cache.HUGE_PAGE)  # the 16 MiB file: two chunks
    monkeypatch.setattr(page_cache, "enabled", lambda: True)
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: given.append((off, n, advice)))
    return given


def test_chunks_cached_in_small_pages_are_dropped_and_read_again(model_file, monkeypatch, caplog):
    given = _spy(monkeypatch, [[1.0, 0.2], [0.97]])  # the second chunk small, then read again
    with caplog.at_level(logging.INFO, logger="moestream.engine.page_cache"):
        page_cache.prepare(model_file)
    chunk = 4 * page_cache.HUGE_PAGE
    assert given == [(chunk, chunk, os.POSIX_FADV_DONTNEED)]  # that chunk only
    assert "0.01 GiB of it read again into 2 MiB pages" in caplog.text and "now 97%" in caplog.text


def test_a_file_already_in_huge_pages_is_left_alone(model_file, monkeypatch):
    given = _spy(monkeypatch, [[0.95, 1.0]])
    page_cache.prepare(model_file)
    assert given == []


def test_a_file_larger_than_the_memory_available_is_not_read_in(model_file, monkeypatch):
    given = _spy(monkeypatch, [])  # chunk_shares must not even be called
    monkeypatch.setattr(page_cache, "available_bytes", lambda: model_file.stat().st_size)
    page_cache.prepare(model_file)
    assert given == []


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("MOESTREAM_HUGE_PAGES", "0")
    assert not page_cache.enabled()


@pytest.mark.skipif(not page_cache.enabled(), reason="no MADV_HUGEPAGE or /proc/self/smaps on this OS")
def test_prepare_puts_the_file_in_huge_pages_where_the_kernel_can(model_file):
    """On this machine's kernel and filesystem. Where the page cache cannot hold 2 MiB folios
    (a filesystem without large folios, THP off) the share stays low and prepare must still
    leave the file readable with the same bytes."""
    before = model_file.read_bytes()
    page_cache.prepare(model_file)
    share = page_cache.huge_share(model_file)
    assert model_file.read_bytes() == before
    thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read() if os.path.exists(
        "/sys/kernel/mm/transparent_hugepage/enabled") else ""
    if "[never]" in thp:
        assert share == 0.0
    else:
        print(f"share in 2 MiB pages after prepare: {share:.2f}")  # filesystem dependent
        assert 0.0 <= share <= 1.0


def test_only_a_load_for_compute_prepares_the_file(monkeypatch):
    """`moestream inspect` and the checks before loading read the header only: reading a
    whole file into the page cache there would cost minutes on a large model."""
    from moestream.engine import loader
    from tests.fixtures.models import get_fixture

    prepared, advised = [], []
    monkeypatch.setattr(page_cache, "prepare", lambda path: prepared.append(path))
    monkeypatch.setattr(page_cache, "advise", lambda array: advised.append(array))
    path = get_fixture("olmoe", "Q4_K_M").gguf_path
    loader.open_gguf(path)
    assert prepared == [] and advised == []
    loader.open_gguf(path, compute=True)
    assert len(prepared) == 1 and len(advised) == 1
