"""Check and benchmark the Triton GGUF kernels on a GPU: `python -m bench.kernels`.

1. Measures the device-to-device copy rate: (bytes read + bytes written) / time of a 1 GiB
   `copy_`, the ceiling a weight-streaming kernel can approach.
2. For every Triton type and shape: checks the GEMV and GEMM kernels against the torch
   reference (dequantize + fp32 matmul) on the GPU, in fp16 and bf16 (the interpreter cannot
   check bf16), then times them. GB/s counts the quantized weight bytes read once.
3. Checks and times the grouped MoE kernel and the expert FFN over shuffled cache slots.

Prints one table per part and exits 1 if any check fails. `--cpu-smoke` runs tiny shapes
through the Triton interpreter on the CPU to test this script itself (timings meaningless).
"""

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from gguf import GGMLQuantizationType as Q

# (N, K) of expert and dense projections: OLMoE / Qwen3-30B-A3B experts, Mixtral expert, 7B.
SHAPES = [(1024, 2048), (2048, 1024), (768, 2048), (2048, 768), (14336, 4096), (4096, 14336), (4096, 4096)]
ROWS = [1, 2, 4, 8, 16, 64, 512]
SMOKE_SHAPES, SMOKE_ROWS = [(64, 512)], [1, 3, 17]
# Expert types of common GGUF mixes; Q5_0 is Qwen1.5-MoE Q4_K_M's down projection in half its layers.
MOE_TYPES = (Q.Q4_K, Q.Q6_K, Q.Q8_0, Q.Q5_0)
REL_TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 1e-3}  # fp32 dots run in TF32


@dataclass
class Row:
    kernel: str
    qtype: str
    dtype: str
    m: int
    n: int
    k: int
    time_us: float
    gb_s: float
    pct_copy: float
    torch_us: float
    rel_err: float

    def cells(self) -> list[str]:
        return [self.kernel, self.qtype, self.dtype, str(self.m), str(self.n), str(self.k),
                f"{self.time_us:.1f}", f"{self.gb_s:.0f}", f"{self.pct_copy:.0f}%", f"{self.torch_us:.1f}",
                f"{self.rel_err:.1e}"]


@dataclass
class Report:
    """Prints each row as it is measured and, with a JSON path, rewrites the file after each row:
    a run stopped at a time limit keeps what it measured."""
    device: str
    copy_gb_s: float
    json_path: str | None
    rows: list[Row] = field(default_factory=list)

    def add(self, row: Row) -> None:
        print(_format([row.cells()], widths=_WIDTHS), flush=True)
        self.rows.append(row)
        self.save()

    def save(self, checks_failed: int | None = None) -> None:
        if self.json_path:
            with open(self.json_path, "w") as f:
                json.dump({"device": self.device, "copy_gb_s": self.copy_gb_s, "checks_failed": checks_failed,
                           "finished": checks_failed is not None, "rows": [asdict(r) for r in self.rows]}, f,
                          indent=1)


HEADER = ["kernel", "type", "dtype", "M", "N", "K", "us", "GB/s", "%copy", "torch us", "max rel err"]


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds per call (L2 flushed between calls on CUDA)."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    fn()
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return sorted(samples)[1]


def copy_gb_s(device: torch.device) -> float:
    """Device-to-device copy rate, counting bytes read plus bytes written."""
    n_bytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n_bytes / time_ms(lambda: dst.copy_(src), device) / 1e6


def weight_blocks(qtype: Q, n_blocks: int, gen: torch.Generator) -> torch.Tensor:
    """Random blocks with fp16 scales near 2**-10, so weights are O(1) as in real models and
    fp16 activations through a whole expert FFN stay finite."""
    from moestream.kernels.formats import block_format, random_blocks

    fmt = block_format(qtype)
    blocks = random_blocks(qtype, n_blocks, gen)
    for offset in fmt.fp16_fields:
        blocks[:, offset : offset + 2] = _small_scales(n_blocks, gen).view(torch.uint8).reshape(n_blocks, 2)
    if fmt.nibble_fp16_scale_offset is not None:  # IQ1_M: the top nibbles of four uint16 words
        bits = _small_scales(n_blocks, gen).view(torch.int16).int() & 0xFFFF
        for word in range(4):
            high_byte = fmt.nibble_fp16_scale_offset + 2 * word + 1
            nibble = ((bits >> (4 * word)) & 0xF).to(torch.uint8)
            blocks[:, high_byte] = (blocks[:, high_byte] & 0x0F) | (nibble << 4)
    return blocks


def _small_scales(n: int, gen: torch.Generator) -> torch.Tensor:
    """n fp16 values of magnitude 2**-10 .. 1.5 * 2**-10, either sign."""
    scale = (torch.rand(n, generator=gen) + 0.5) * 2**-10
    return torch.where(torch.rand(n, generator=gen) < 0.5, -scale, scale).half()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Max |y - ref| / max |ref|; inf when y has a NaN/inf."""
    if not torch.isfinite(y).all():
        return float("inf")
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def bench_matmuls(qtypes: list[Q], shapes, rows, dtypes, device: torch.device, copy_rate: float,
                  report: Report) -> list[Row]:
    from moestream.kernels.formats import row_bytes
    from moestream.kernels.dispatch import qmatmul
    from moestream.kernels.triton_gemm import triton_gemm
    from moestream.kernels.triton_gemv import MAX_GEMV_ROWS, triton_gemv

    gen = torch.Generator().manual_seed(0)
    table = []
    for qtype in qtypes:
        for n, k in shapes:
            rb = row_bytes(qtype, k)
            raw = weight_blocks(qtype, n * rb // _type_size(qtype), gen).reshape(n, rb).to(device)
            for dtype in dtypes:
                for m in rows:
                    x = torch.randn(m, k, generator=gen).to(device, dtype)
                    ref = qmatmul(x, raw, qtype, (n, k), backend="torch")
                    torch_us = time_ms(lambda: qmatmul(x, raw, qtype, (n, k), backend="torch"), device) * 1e3
                    kernels = [("gemm", triton_gemm)] + ([("gemv", triton_gemv)] if m <= MAX_GEMV_ROWS else [])
                    for name, kernel in kernels:
                        err = rel_err(kernel(x, raw, qtype, (n, k)), ref)
                        us = time_ms(lambda: kernel(x, raw, qtype, (n, k)), device) * 1e3
                        gb_s = raw.numel() / us / 1e3
                        table.append(Row(name, qtype.name, str(dtype)[6:], m, n, k, us, gb_s,
                                         100 * gb_s / copy_rate, torch_us, err))
                        report.add(table[-1])
    return table


def bench_moe(qtype: Q, dims: tuple[int, int, int, int], tokens: list[int], dtype, device, copy_rate,
              report: Report) -> list[Row]:
    """Grouped gate|up matmul and the whole expert FFN over n_experts shuffled slots, top-k routing."""
    from moestream.kernels.expert_layout import SlotLayout, SlotTensor
    from moestream.kernels.moe_ffn import moe_ffn
    from moestream.kernels.dispatch import grouped_qmatmul

    n_experts, top_k, hidden, inter = dims
    gen = torch.Generator().manual_seed(1)
    gate = SlotTensor(0, qtype, (inter, hidden))
    up = SlotTensor(gate.end_bytes, qtype, (inter, hidden))
    layout = SlotLayout(gate, up, SlotTensor(up.end_bytes, qtype, (hidden, inter)))
    n_slots = n_experts + 8
    blocks = weight_blocks(qtype, n_slots * layout.slot_bytes // _type_size(qtype), gen)
    slots = blocks.reshape(n_slots, layout.slot_bytes).to(device)
    slot_of_expert = torch.randperm(n_slots, generator=gen)[:n_experts].to(device, torch.int32)
    table = []
    for n_tokens in tokens:
        topk_ids = torch.stack([torch.randperm(n_experts, generator=gen)[:top_k] for _ in range(n_tokens)]).to(device)
        topk_weights = torch.rand(n_tokens, top_k, generator=gen).to(device)
        x = torch.randn(n_tokens, hidden, generator=gen).to(device, dtype)
        touched_bytes = torch.unique(topk_ids).numel() * layout.slot_bytes
        fused = layout.fused_gate_up
        cases = [  # name, run(backend), (N, K), weight bytes read
            ("moe gate|up", lambda b: grouped_qmatmul(x, slots, slot_of_expert, fused, topk_ids, backend=b),
             (2 * inter, hidden), touched_bytes * 2 // 3),
            ("moe ffn", lambda b: moe_ffn(x, slots, slot_of_expert, layout, topk_ids, topk_weights, backend=b),
             (hidden, inter), touched_bytes),
        ]
        for name, run, (n, k), n_bytes in cases:
            err = rel_err(run("triton"), run("torch"))
            us = time_ms(lambda: run("triton"), device) * 1e3
            torch_us = time_ms(lambda: run("torch"), device) * 1e3
            gb_s = n_bytes / us / 1e3
            table.append(Row(name, qtype.name, str(dtype)[6:], n_tokens, n, k, us, gb_s,
                             100 * gb_s / copy_rate, torch_us, err))
            report.add(table[-1])
    return table


def _type_size(qtype: Q) -> int:
    from moestream.kernels.formats import block_format

    return block_format(qtype).type_size


_WIDTHS = [12, 8, 9, 5, 6, 6, 9, 6, 6, 9, 11]


def _format(rows: list[list[str]], widths: list[int]) -> str:
    return "\n".join(" ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", help="comma-separated GGUF types (default: every Triton type)")
    parser.add_argument("--quick", action="store_true", help="one shape, M in {1, 16, 512}, fp16 only")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes under the Triton interpreter")
    parser.add_argument("--json", metavar="PATH",
                        help="also write the device, copy rate and the rows here (rewritten after each row)")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of a kernel module
    elif not torch.cuda.is_available():
        print("bench.kernels needs a CUDA GPU (or --cpu-smoke)", file=sys.stderr)
        return 2
    from moestream.kernels.triton_configs import TRITON_QTYPES

    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    qtypes = [Q[name] for name in args.types.split(",")] if args.types else sorted(TRITON_QTYPES, key=int)
    shapes, rows = (SMOKE_SHAPES, SMOKE_ROWS) if args.cpu_smoke else (SHAPES, ROWS)
    dtypes = [torch.float16] if args.cpu_smoke or args.quick else [torch.float16, torch.bfloat16]
    if args.quick:
        shapes, rows = SHAPES[:1], [1, 16, 512]
    moe_dims, moe_tokens = ((8, 2, 256, 256), [1, 8]) if args.cpu_smoke else ((64, 8, 2048, 1024), [1, 16, 256])

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    copy_rate = copy_gb_s(device)
    print(f"device: {name}; device-to-device copy: {copy_rate:.0f} GB/s (read + write)")
    print(_format([HEADER], _WIDTHS))
    report = Report(name, copy_rate, args.json)
    table = []  # the grouped kernels first: the figures that matter most for offloading
    for qtype in qtypes[:1] if args.cpu_smoke else [q for q in MOE_TYPES if q in qtypes]:
        table += bench_moe(qtype, moe_dims, moe_tokens, dtypes[0], device, copy_rate, report)
    table += bench_matmuls(qtypes, shapes, rows, dtypes, device, copy_rate, report)
    failed = [r for r in table if not r.rel_err <= REL_TOL[getattr(torch, r.dtype)]]
    for r in failed:
        print(f"CHECK FAILED: {r.kernel} {r.qtype} {r.dtype} M={r.m} N={r.n} K={r.k}: error {r.rel_err:.2e}")
    print(f"{len(table) - len(failed)}/{len(table)} checks passed")
    report.save(checks_failed=len(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
