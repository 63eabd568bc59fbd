"""The model file's pages in 2 MiB folios, so that the CPU reads weights through huge pages.

Decode on the CPU reads every weight it uses from the memory-mapped file, once a token. With
the file in the page cache as 4 KiB pages the two-thread read rate of this project's dev box
was 27-29 GB/s; the same bytes in 2 MiB pages (one TLB entry per 2 MiB, no page walks in the
stream) read at 34-35 GB/s (docs/PERFORMANCE.md, "Huge pages"). Linux gives a file mapping
2 MiB page-cache folios, mapped with one PMD each, when the mapping is `MADV_HUGEPAGE` before
its pages are read in and 2 MiB aligned (the kernel aligns large file mappings itself); pages
already cached as 4 KiB folios stay small.

`prepare(path)` runs before the file is mapped for good: probe mappings of 64 MiB chunks,
advised, touched once per 2 MiB (which reads an uncached file in, in 2 MiB folios); a chunk
then mapped mostly with small pages was cached by an earlier read (a download, `moestream
synth`, another program's mapping), so its cached pages are dropped (`POSIX_FADV_DONTNEED`;
pages another process maps stay) and read in again. `advise(array)` marks the final mapping.
Only where the file fits in the memory available; larger files stream through the page
cache as before, and are only advised. Nothing here changes a byte the engine reads.
`MOESTREAM_HUGE_PAGES=0` turns it all off.
"""

from __future__ import annotations

import logging
import mmap
import os
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
# A chunk of the file with less than this share in 2 MiB mappings is dropped and read again.
HUGE_SHARE = 0.9
# The file is probed (and dropped and read again) in chunks of this many bytes.
CHUNK = 64 << 20
# The file is read in at load only when it takes at most this share of the memory available.
FITS_SHARE = 0.9


def enabled() -> bool:
    return (os.environ.get("MOESTREAM_HUGE_PAGES", "1") != "0" and hasattr(mmap, "MADV_HUGEPAGE")
            and Path("/proc/self/smaps").exists())


def available_bytes() -> int:
    """MemAvailable of /proc/meminfo (0 where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pmd_mapped(smaps=None) -> dict[int, int]:
    """{start address: FilePmdMapped bytes} of every mapping in `smaps` (lines; default this
    process's /proc/self/smaps)."""
    if smaps is None:
        with open("/proc/self/smaps") as f:
            return pmd_mapped(f)
    found: dict[int, int] = {}
    start = None
    for line in smaps:
        head = line.split(None, 1)[0] if line.strip() else ""
        if "-" in head and not head.endswith(":"):
            start = int(head.split("-")[0], 16)
        elif start is not None and head == "FilePmdMapped:":
            found[start] = int(line.split()[1]) * 1024
    return found


def _touch(array: np.ndarray) -> None:
    """Read one byte in every 2 MiB (a fault maps or reads in the whole folio around it)."""
    int(array[::HUGE_PAGE].sum(dtype=np.uint64))


def chunk_shares(path: Path, chunks: list[tuple[int, int]] | None = None) -> list[tuple[int, int, float]]:
    """(offset, length, share in 2 MiB pages) of each CHUNK of `path` (or of `chunks`), seen
    through advised mappings after one touch per 2 MiB (which reads uncached parts in as
    2 MiB folios). A chunk the kernel did not map 2 MiB-aligned counts as 1 (nothing to gain)."""
    size = path.stat().st_size
    if chunks is None:
        chunks = [(off, min(CHUNK, size - off)) for off in range(0, size, CHUNK)]
    maps, shares = [], []
    with open(path, "rb") as f:
        try:
            for off, length in chunks:
                m = mmap.mmap(f.fileno(), length, prot=mmap.PROT_READ, offset=off)
                m.madvise(mmap.MADV_HUGEPAGE)
                array = np.frombuffer(m, dtype=np.uint8)
                _touch(array)
                maps.append((m, array.ctypes.data))
                del array
            mapped = pmd_mapped()
            for (off, length), (_, address) in zip(chunks, maps):
                whole = length // HUGE_PAGE * HUGE_PAGE
                share = 1.0 if address % HUGE_PAGE or whole == 0 else mapped.get(address, 0) / whole
                shares.append((off, length, share))
        finally:
            for m, _ in maps:
                m.close()
    return shares


def huge_share(path: Path) -> float:
    """The share of `path` in 2 MiB pages (chunk_shares, weighted by length)."""
    shares = chunk_shares(path)
    total = sum(length for _, length, _ in shares)
    return sum(length * share for _, length, share in shares) / total if total else 1.0


def prepare(path: str | Path) -> None:
    """Before the model file is mapped: have its page cache in 2 MiB folios where it fits in
    memory (see the module's text). Best effort: any failure leaves the file as it was."""
    path = Path(path)
    if not enabled():
        return
    try:
        size = path.stat().st_size
        if size < HUGE_PAGE or size > FITS_SHARE * available_bytes():
            return
        started = time.perf_counter()
        small = [(off, length) for off, length, share in chunk_shares(path) if share < HUGE_SHARE]
        if not small:
            log.debug("%s: in 2 MiB pages", path)
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            for off, length in small:
                os.posix_fadvise(fd, off, length, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        after = chunk_shares(path, small)
        share = sum(length * s for _, length, s in after) / sum(length for _, length in small)
        log.info("%s: %s of it read again into 2 MiB pages (it was cached in 4 KiB pages by an earlier "
                 "read; now %.0f%% of that in 2 MiB pages, %.1f s): the CPU reads weights faster from them",
                 path, _gib(sum(length for _, length in small)), 100 * share, time.perf_counter() - started)
    except (OSError, ValueError) as error:
        log.debug("%s: huge pages not prepared (%s)", path, error)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def advise(array: np.ndarray) -> None:
    """Mark the model's mapping (the reader's memmap) MADV_HUGEPAGE: pages it reads in later
    come as 2 MiB folios."""
    if not enabled():
        return
    raw = getattr(array, "_mmap", None)
    if raw is None:
        return
    try:
        raw.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError) as error:
        log.debug("MADV_HUGEPAGE refused (%s)", error)
