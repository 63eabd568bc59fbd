"""Activation rows in vector lanes against one row at a time (AVX-512 int8 route):
`python -m bench.cpu_lanes [--threads 2] [--rows 4,8,12,16,32,128]`.

Builds the CPU kernels twice: as shipped (passes of 8+ activation rows in vector lanes,
kernels/cpu/csrc/lanes.h) and with `-DMOESTREAM_LANE_MIN_ROWS=1000000` (every pass through
fused_rows, which dots a decoded block with up to 8 rows one row at a time). Times Q4_K and
Q6_K [768, 2048] (a Qwen3-30B-A3B expert's gate) at each row count M, reading the weights from
DRAM in 2 MiB pages as bench.cpu_prefetch does. Prints GMAC/s, the median of three. On a
build without AVX-512 VNNI both rows run the same code.
"""

from __future__ import annotations

import argparse
import os

import torch
from gguf import GGMLQuantizationType as Q

import moestream.kernels.cpu.build as build
from bench.cpu_prefetch import _copies, _gmacs

BUILDS = {"fused rows": ("-DMOESTREAM_LANE_MIN_ROWS=1000000",), "lanes": ()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rows", default="4,8,12,16,32,128", help="comma-separated activation row counts M")
    parser.add_argument("--seconds", type=float, default=0.3, help="timing budget per figure")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(m) for m in args.rows.split(",")]
    exts = {name: build.compile_extension(without=flags) for name, flags in BUILDS.items()}
    print(f"load average {os.getloadavg()[0]:.2f}, {args.threads} threads, GMAC/s (median of 3)")
    print(f"{'type':<6}{'path':>11}" + "".join(f"{'M=' + str(m):>9}" for m in rows))
    for qtype in (Q.Q4_K, Q.Q6_K):
        copies, _buf = _copies(qtype)
        for name, ext in exts.items():
            rates = [_gmacs(ext, qtype, copies, m, args.seconds) for m in rows]
            print(f"{qtype.name:<6}{name:>11}" + "".join(f"{r:>9.1f}" for r in rates), flush=True)


if __name__ == "__main__":
    main()
