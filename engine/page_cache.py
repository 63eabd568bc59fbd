"""The model file's pages in 2 MiB folios, so that the CPU reads weights through huge pages.

Decode on the CPU reads every weight it uses from the memory-mapped file, once a token. With
the file in the page cache as 4 KiB pages the two-thread read rate of this project's dev box
was 27-29 GB/s; the same bytes in 2 MiB pages (one TLB entry per 2 MiB, no page walks in the
stream) read at 34-35 GB/s (docs/PERFORMANCE.md, "Huge pages"). Linux gives a file mapping
2 MiB page-cache folios, mapped with one PMD each, when the mapping is `MADV_HUGEPAGE` before
its pages are read in and 2 MiB aligned (the kernel aligns large file mappings itself); pages
already cached as 4 KiB folios stay small.

`prepare(path)` runs before the file is mapped for good: a probe mapping, advised, touched
once per 2 MiB (which reads an uncached file in, in 2 MiB folios); if most of the file is
then mapped with small pages, those came from an earlier read (a download, `moestream synth`,
a run without this), so the file's cached pages are dropped (`POSIX_FADV_DONTNEED`; pages
another process maps stay) and read in again. `advise(array)` marks the final mapping.
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
# At least this share of the file in 2 MiB mappings counts as "held in huge pages".
HUGE_SHARE = 0.5
# The file is read in at load only when it takes at most this share of the memory available.
FITS_SHARE = 0.8


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


def pmd_mapped_bytes(address: int, smaps=None) -> int:
    """FilePmdMapped of the mapping that starts at `address` in `smaps` (lines; default this
    process's /proc/self/smaps)."""
    if smaps is None:
        with open("/proc/self/smaps") as f:
            return pmd_mapped_bytes(address, f)
    inside = False
    for line in smaps:
        head = line.split(None, 1)[0] if line.strip() else ""
        if "-" in head and not head.endswith(":"):
            inside = int(head.split("-")[0], 16) == address
        elif inside and head == "FilePmdMapped:":
            return int(line.split()[1]) * 1024
    return 0


def _touch(array: np.ndarray) -> None:
    """Read one byte in every 2 MiB (a fault maps or reads in the whole folio around it)."""
    int(array[::HUGE_PAGE].sum(dtype=np.uint64))


def huge_share(path: Path) -> float:
    """The share of `path` that an advised mapping sees in 2 MiB pages after one touch per
    2 MiB (which reads uncached parts in as 2 MiB folios)."""
    size = path.stat().st_size
    if size < HUGE_PAGE:
        return 1.0
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as probe:
        probe.madvise(mmap.MADV_HUGEPAGE)
        array = np.frombuffer(probe, dtype=np.uint8)
        address = array.ctypes.data
        if address % HUGE_PAGE:  # a kernel that does not align file mappings: nothing to gain here
            del array
            return 1.0
        _touch(array)
        share = pmd_mapped_bytes(address) / (size // HUGE_PAGE * HUGE_PAGE)
        del array
    return share


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
        share = huge_share(path)
        if share >= HUGE_SHARE:
            log.debug("%s: %.0f%% in 2 MiB pages", path, 100 * share)
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        after = huge_share(path)
        log.info("%s: read into 2 MiB pages (%.0f%% of it was in 4 KiB pages from an earlier read; "
                 "now %.0f%% in 2 MiB pages, %.1f s): the CPU reads weights faster from them",
                 path, 100 * (1 - share), 100 * after, time.perf_counter() - started)
    except (OSError, ValueError) as error:
        log.debug("%s: huge pages not prepared (%s)", path, error)


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
