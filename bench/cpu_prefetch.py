"""How far ahead the CPU kernels should prefetch weights: `python -m bench.cpu_prefetch
[--threads 2] [--rows 1,4,8] [--distances 0,1024,2048,4096]`.

For each distance (bytes ahead of the block being decoded; 0 = no software prefetch) the
kernels are built with `-DMOESTREAM_PREFETCH_BYTES=D` (kernels/cpu/csrc/matmul.h) and time
Q4_K and Q6_K [768, 2048] (a Qwen3-30B-A3B expert's gate) at each row count M, with the
weights in 2 MiB pages (as engine/page_cache.py gives the model file) rotating over 150
copies so that every call reads them from DRAM. Prints GMAC/s, the median of three.
"""

from __future__ import annotations

import argparse
import mmap
import os
import time

import torch
from gguf import GGMLQuantizationType as Q

import moestream.kernels.cpu.build as build
from moestream.kernels import block_format, random_blocks

N, K, COPIES = 768, 2048, 150


def _copies(qtype: Q) -> tuple[list[torch.Tensor], mmap.mmap]:
    g = torch.Generator().manual_seed(0)
    one = random_blocks(qtype, N * K // block_format(qtype).block_size, g).reshape(-1)
    buf = mmap.mmap(-1, one.numel() * COPIES + (4 << 20))
    buf.madvise(mmap.MADV_HUGEPAGE)
    arr = torch.frombuffer(buf, dtype=torch.uint8)
    start = (-arr.data_ptr()) % (2 << 20)
    copies = [arr[start + i * one.numel():start + (i + 1) * one.numel()] for i in range(COPIES)]
    for c in copies:
        c.copy_(one)
    return copies, buf


def _gmacs(ext, qtype: Q, copies: list[torch.Tensor], m: int, seconds: float) -> float:
    x, y = torch.randn(m, K), torch.empty(m, N)
    rates = []
    for _ in range(3):
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            for w in copies:
                ext.qmatmul(x.data_ptr(), w.data_ptr(), int(qtype), m, N, K, y.data_ptr(), False)
                n += 1
        rates.append(m * N * K * n / (time.perf_counter() - start) / 1e9)
    return sorted(rates)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rows", default="1,4,8", help="comma-separated activation row counts M")
    parser.add_argument("--distances", default="0,1024,2048,4096", help="prefetch distances in bytes")
    parser.add_argument("--seconds", type=float, default=0.3, help="timing budget per figure")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(m) for m in args.rows.split(",")]
    print(f"load average {os.getloadavg()[0]:.2f}, {args.threads} threads, GMAC/s (median of 3)")
    print(f"{'type':<6}{'prefetch B':>11}" + "".join(f"{'M=' + str(m):>9}" for m in rows))
    for qtype in (Q.Q4_K, Q.Q6_K):
        copies, _buf = _copies(qtype)
        for d in args.distances.split(","):
            ext = build.compile_extension(without=(f"-DMOESTREAM_PREFETCH_BYTES={int(d)}",))
            rates = [_gmacs(ext, qtype, copies, m, args.seconds) for m in rows]
            print(f"{qtype.name:<6}{int(d):>11}" + "".join(f"{r:>9.1f}" for r in rates), flush=True)


if __name__ == "__main__":
    main()
