"""Benchmark the CPU GGUF kernels: `python -m bench.cpu_kernels [--types Q4_K,Q6_K] [--threads 2]`.

For every type, OLMoE expert shape (gate/up 1024x2048, down 2048x1024) and row count M it
prints: the kernel's time per call and GB/s on the quantized bytes, the torch reference
(kernels.dequantize + F.linear) and our speed-up over it, and the fp32 GEMV (F.linear on a
float matrix of the same shape): its time, GB/s on its float bytes, and our quantized GB/s
as a fraction of it. Weights rotate over enough copies to exceed the last-level cache, as
experts do during decode (each is read once per token from DRAM). Then one OLMoE expert FFN
(Q4_K gate/up, Q6_K down) through `cpu_expert_ffn` and the expert time per token it implies.
The load average is printed too: on a shared machine other work skews every figure.
"""

import argparse
import os
import platform
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from kernels import block_format, dequantize, random_blocks, row_bytes
from kernels.cpu import cpu_expert_ffn, cpu_qmatmul
from kernels.cpu.build import load_extension

SHAPES = [(1024, 2048), (2048, 1024)]  # OLMoE expert gate/up and down, (N, K)
TYPES = "Q4_K,Q5_K,Q6_K,Q8_0,IQ4_XS,IQ3_S,IQ3_XXS,IQ2_S,IQ2_XS,IQ2_XXS"
ROTATION_BYTES = 192 << 20  # > 3x a 32 MiB L3: every call reads its weights from DRAM
OLMOE_LAYERS, OLMOE_ACTIVE_EXPERTS = 16, 8


@dataclass(frozen=True)
class Timing:
    ms: float
    gb_s: float


def time_rotating(call: Callable[[int], object], copies: int, nbytes: int, min_s: float) -> Timing:
    """Best over repeats of the mean time of `call(i)` for i in range(copies)."""
    call(0)
    best, spent = float("inf"), 0.0
    while spent < min_s:
        start = time.perf_counter()
        for i in range(copies):
            call(i)
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed / copies), spent + elapsed
    return Timing(best * 1e3, nbytes / best / 1e9)


def random_weights(qtype: Q, shape: tuple[int, int], gen: torch.Generator, copies: int) -> list[torch.Tensor]:
    n_blocks = shape[0] * shape[1] // block_format(qtype).block_size
    return [random_blocks(qtype, n_blocks, gen) for _ in range(copies)]


def copies_for(nbytes: int) -> int:
    return max(2, ROTATION_BYTES // nbytes)


def bench_type(qtype: Q, shape: tuple[int, int], rows: list[int], gen: torch.Generator, min_s: float) -> list[str]:
    n, k = shape
    nbytes = n * row_bytes(qtype, k)
    weights = random_weights(qtype, shape, gen, copies_for(nbytes))
    floats = [torch.randn(n, k, generator=gen) for _ in range(copies_for(4 * n * k))]
    lines = []
    for m in rows:
        x = torch.randn(m, k, generator=gen)
        ours = time_rotating(lambda i: cpu_qmatmul(x, weights[i], qtype, shape), len(weights), nbytes, min_s)
        torch_ref = time_rotating(lambda i: F.linear(x, dequantize(weights[i], qtype, shape)), 2, nbytes, min_s / 4)
        fp32 = time_rotating(lambda i: F.linear(x, floats[i]), len(floats), 4 * n * k, min_s)
        lines.append(f"| {qtype.name} | {n}x{k} | {m} | {ours.ms:.3f} | {ours.gb_s:.1f} | {torch_ref.ms:.2f} "
                     f"| {torch_ref.ms / ours.ms:.0f}x | {fp32.ms:.3f} | {fp32.gb_s:.1f} | {ours.gb_s / fp32.gb_s:.2f} |")
        print(lines[-1], flush=True)
    return lines


def bench_expert(gen: torch.Generator, tokens: int, min_s: float) -> str:
    """One OLMoE expert: gate/up Q4_K [1024, 2048], down Q6_K [2048, 1024]."""
    d_model, inter = 2048, 1024
    qtypes = (Q.Q4_K, Q.Q4_K, Q.Q6_K)
    nbytes = 2 * inter * row_bytes(Q.Q4_K, d_model) + d_model * row_bytes(Q.Q6_K, inter)
    copies = copies_for(nbytes)
    gate, up = (random_weights(Q.Q4_K, (inter, d_model), gen, copies) for _ in range(2))
    down = random_weights(Q.Q6_K, (d_model, inter), gen, copies)
    x = torch.randn(tokens, d_model, generator=gen) * 0.1

    def ffn(i: int) -> torch.Tensor:
        return cpu_expert_ffn(x, gate[i], up[i], down[i], qtypes, inter)

    def three_calls(i: int) -> torch.Tensor:
        h = F.silu(cpu_qmatmul(x, gate[i], Q.Q4_K, (inter, d_model))) * cpu_qmatmul(x, up[i], Q.Q4_K, (inter, d_model))
        return cpu_qmatmul(h, down[i], Q.Q6_K, (d_model, inter))

    fused = time_rotating(ffn, copies, nbytes, min_s)
    separate = time_rotating(three_calls, copies, nbytes, min_s)
    per_token_ms = fused.ms * OLMOE_LAYERS * OLMOE_ACTIVE_EXPERTS
    return (f"OLMoE expert FFN (Q4_K gate/up, Q6_K down, {nbytes / 2**20:.2f} MiB), T={tokens}: "
            f"cpu_expert_ffn {fused.ms:.3f} ms ({fused.gb_s:.1f} GB/s), three cpu_qmatmul calls "
            f"{separate.ms:.3f} ms; x {OLMOE_LAYERS} layers x {OLMOE_ACTIVE_EXPERTS} experts = "
            f"{per_token_ms:.1f} ms of expert work per token ({1e3 / per_token_ms:.1f} tok/s if experts were all)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=TYPES, help="comma-separated GGML type names")
    parser.add_argument("--rows", default="1,8", help="comma-separated activation row counts M")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--min-seconds", type=float, default=1.0, help="timing budget per figure")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ext = load_extension()
    if ext is None:
        raise SystemExit("the C++ CPU kernels did not build; nothing to benchmark")
    gen = torch.Generator().manual_seed(0)
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, kernels {ext.isa}, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}")
    print("| type | N x K | M | ms | GB/s | torch ref ms | speed-up | fp32 GEMV ms | fp32 GB/s | GB/s vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = [int(m) for m in args.rows.split(",")]
    for name in args.types.split(","):
        for shape in SHAPES:
            bench_type(Q[name], shape, rows, gen, args.min_seconds)
    for tokens in rows:
        print(bench_expert(gen, tokens, args.min_seconds))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
