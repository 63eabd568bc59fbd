"""Benchmark the CPU GGUF kernels: `python -m bench.cpu_kernels [--types Q4_K,Q6_K] [--threads 2]`.

For every type, OLMoE expert shape (gate/up 1024x2048, down 2048x1024) and row count M it
prints: the kernel's time per call and GB/s on the quantized bytes, the torch reference
(kernels.dequantize + F.linear) and our speed-up over it, and the fp32 GEMV (F.linear on a
float matrix of the same shape): its time, GB/s on its float bytes, and our quantized GB/s
as a fraction of it. Weights rotate over enough copies to exceed the last-level cache, as
experts do during decode (each is read once per token from DRAM). Then one OLMoE expert FFN
(Q4_K gate/up, Q6_K down) through `cpu_expert_ffn` and the expert time per token it implies.
`--exact` adds the exact route (`exact=True`: float32 activations, fp32 FMAs) beside it: its
time, GB/s and time over the int8 route's, and the expert FFN through it.
`--routes` instead compares the candidate routes on Q4_K [1024, 2048] (how the route was
chosen): this int8 kernel, dequantize + F.linear (sgemm), torch's int4pack matmul (the
layout Q4_K's per-32 scale and min would be repacked into), and with `--inductor` also a
torch.compile'd dequant-GEMV (about a minute of compiling).
The load average is printed too: on a shared machine other work skews wall-clock figures,
so `--threads 1` times with the thread's CPU time instead (time.thread_time: preemption by
other processes does not count, cache and DRAM contention still do): per-core rates.
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

from moestream.kernels import block_format, dequantize, random_blocks, row_bytes
import moestream.kernels.cpu.qmatmul as cpu_api
from moestream.kernels.cpu import cpu_dequantize, cpu_expert_ffn, cpu_qmatmul
from moestream.kernels.cpu.build import WITHOUT_AVX2, WITHOUT_AVX512, compile_extension, load_extension

BUILDS = {"native": (), "avx2": WITHOUT_AVX512, "plain-cpp": WITHOUT_AVX2}

SHAPES = [(1024, 2048), (2048, 1024)]  # OLMoE expert gate/up and down, (N, K)
TYPES = "Q4_K,Q5_K,Q6_K,Q8_0,IQ4_XS,IQ3_S,IQ3_XXS,IQ2_S,IQ2_XS,IQ2_XXS"
ROTATION_BYTES = 192 << 20  # > 3x a 32 MiB L3: every call reads its weights from DRAM
OLMOE_LAYERS, OLMOE_ACTIVE_EXPERTS = 16, 8


@dataclass(frozen=True)
class Timing:
    ms: float
    gb_s: float


def clock() -> Callable[[], float]:
    """Thread CPU time when single-threaded (immune to preemption), else wall time."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def time_rotating(call: Callable[[int], object], copies: int, nbytes: int, min_s: float) -> Timing:
    """Best over repeats of the mean time of `call(i)` for i in range(copies)."""
    call(0)
    now = clock()
    best, spent = float("inf"), 0.0
    while spent < min_s:
        start = now()
        for i in range(copies):
            call(i)
        elapsed = now() - start
        best, spent = min(best, elapsed / copies), spent + elapsed
    return Timing(best * 1e3, nbytes / best / 1e9)


def random_weights(qtype: Q, shape: tuple[int, int], gen: torch.Generator, copies: int) -> list[torch.Tensor]:
    n_blocks = shape[0] * shape[1] // block_format(qtype).block_size
    return [random_blocks(qtype, n_blocks, gen) for _ in range(copies)]


def copies_for(nbytes: int) -> int:
    return max(2, ROTATION_BYTES // nbytes)


def bench_type(qtype: Q, shape: tuple[int, int], rows: list[int], gen: torch.Generator, min_s: float,
               exact: bool) -> list[str]:
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
        line = (f"| {qtype.name} | {n}x{k} | {m} | {ours.ms:.3f} | {ours.gb_s:.1f} | {torch_ref.ms:.2f} "
                f"| {torch_ref.ms / ours.ms:.0f}x | {fp32.ms:.3f} | {fp32.gb_s:.1f} | {ours.gb_s / fp32.gb_s:.2f} |")
        if exact:
            fp = time_rotating(lambda i: cpu_qmatmul(x, weights[i], qtype, shape, exact=True), len(weights), nbytes,
                               min_s)
            line += f" {fp.ms:.3f} | {fp.gb_s:.1f} | {fp.ms / ours.ms:.2f} |"
        lines.append(line)
        print(lines[-1], flush=True)
    return lines


def bench_expert(gen: torch.Generator, tokens: int, min_s: float, exact: bool) -> str:
    """One OLMoE expert: gate/up Q4_K [1024, 2048], down Q6_K [2048, 1024]."""
    d_model, inter = 2048, 1024
    qtypes = (Q.Q4_K, Q.Q4_K, Q.Q6_K)
    nbytes = 2 * inter * row_bytes(Q.Q4_K, d_model) + d_model * row_bytes(Q.Q6_K, inter)
    copies = copies_for(nbytes)
    gate, up = (random_weights(Q.Q4_K, (inter, d_model), gen, copies) for _ in range(2))
    down = random_weights(Q.Q6_K, (d_model, inter), gen, copies)
    x = torch.randn(tokens, d_model, generator=gen) * 0.1

    def ffn(i: int) -> torch.Tensor:
        return cpu_expert_ffn(x, gate[i], up[i], down[i], qtypes, inter, exact)

    def three_calls(i: int) -> torch.Tensor:
        gate_shape, down_shape = (inter, d_model), (d_model, inter)
        h = F.silu(cpu_qmatmul(x, gate[i], Q.Q4_K, gate_shape, exact)) * cpu_qmatmul(x, up[i], Q.Q4_K, gate_shape, exact)
        return cpu_qmatmul(h, down[i], Q.Q6_K, down_shape, exact)

    fused = time_rotating(ffn, copies, nbytes, min_s)
    separate = time_rotating(three_calls, copies, nbytes, min_s)
    route = "exact" if exact else "int8"
    line = (f"OLMoE expert FFN (Q4_K gate/up, Q6_K down, {nbytes / 2**20:.2f} MiB), {route}, T={tokens}: "
            f"cpu_expert_ffn {fused.ms:.3f} ms ({fused.gb_s:.1f} GB/s), three cpu_qmatmul calls {separate.ms:.3f} ms")
    if tokens == 1:  # decode: every layer runs its active experts on one token
        per_token_ms = fused.ms * OLMOE_LAYERS * OLMOE_ACTIVE_EXPERTS
        line += (f"; x {OLMOE_LAYERS} layers x {OLMOE_ACTIVE_EXPERTS} experts = {per_token_ms:.1f} ms of expert "
                 f"work per decoded token ({1e3 / per_token_ms:.1f} tok/s if experts were all)")
    return line


def q4k_inductor_gemv(raw: torch.Tensor, x: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Q4_K dequant-GEMV written as torch ops for torch.compile (route 2 of the comparison)."""
    nb = k // 256
    b = raw.view(n, nb, 144)
    d = b[..., 0:2].contiguous().view(torch.float16).float()
    dmin = b[..., 2:4].contiguous().view(torch.float16).float()
    s = b[..., 4:16].to(torch.int32)
    scale = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 2) & 48)], -1)
    minimum = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 2) & 48)], -1)
    qs = b[..., 16:].to(torch.int32).view(n, nb, 4, 1, 32)
    q = torch.cat([qs & 15, qs >> 4], 3).view(n, nb, 8, 32).float()
    xv = x.view(nb, 8, 32)
    dots = (q * xv).sum(-1)
    return ((d * scale.float()) * dots - (dmin * minimum.float()) * xv.sum(-1)).sum((-1, -2))


def bench_routes(gen: torch.Generator, rows: list[int], min_s: float, inductor: bool) -> None:
    n, k = 1024, 2048
    nbytes = n * row_bytes(Q.Q4_K, k)
    weights = random_weights(Q.Q4_K, (n, k), gen, copies_for(nbytes))
    # int4pack: 4-bit codes [N, K/2] + (scale, zero) per 32 as bf16 [K/32, N, 2]: random codes
    # time the layout; a Q4_K conversion would give the same shapes.
    packed = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen), 1) for _ in range(len(weights))]
    scales_zeros = torch.randn(k // 32, n, 2, generator=gen).to(torch.bfloat16)
    int4_bytes = packed[0].numel() + scales_zeros.numel() * 2
    print(f"Q4_K {n}x{k}: {nbytes / 2**20:.2f} MiB; int4pack layout {int4_bytes / 2**20:.2f} MiB")
    print("| route | M | ms | GB/s (own bytes) | GMAC/s |")
    print("|---|---|---|---|---|")

    def line(route: str, m: int, t: Timing, own_bytes: int) -> None:
        print(f"| {route} | {m} | {t.ms:.3f} | {own_bytes / t.ms / 1e6:.1f} | {n * k * m / t.ms / 1e6:.1f} |", flush=True)

    for m in rows:
        x = torch.randn(m, k, generator=gen)
        line("int8 kernel (cpu_qmatmul)", m, time_rotating(
            lambda i: cpu_qmatmul(x, weights[i], Q.Q4_K, (n, k)), len(weights), nbytes, min_s), nbytes)
        line("exact kernel (cpu_qmatmul, exact=True)", m, time_rotating(
            lambda i: cpu_qmatmul(x, weights[i], Q.Q4_K, (n, k), exact=True), len(weights), nbytes, min_s), nbytes)
        line("cpu_dequantize + F.linear", m, time_rotating(
            lambda i: F.linear(x, cpu_dequantize(weights[i], Q.Q4_K, (n, k))), len(weights), nbytes, min_s), nbytes)
        xb = x.to(torch.bfloat16)
        line("torch int4pack (bf16)", m, time_rotating(
            lambda i: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed[i], 32, scales_zeros),
            len(packed), int4_bytes, min_s), int4_bytes)
    if inductor:
        compiled = torch.compile(q4k_inductor_gemv, dynamic=False)
        x = torch.randn(k, generator=gen)
        line("torch.compile dequant-GEMV", 1, time_rotating(
            lambda i: compiled(weights[i], x, n, k), len(weights), nbytes, min_s), nbytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=TYPES, help="comma-separated GGML type names")
    parser.add_argument("--rows", default="1,8", help="comma-separated activation row counts M")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--min-seconds", type=float, default=1.0, help="timing budget per figure")
    parser.add_argument("--build", choices=list(BUILDS), default="native",
                        help="time the code path of older x86 CPUs (built here with those ISAs off)")
    parser.add_argument("--exact", action="store_true", help="also time the exact route (fp32 activations)")
    parser.add_argument("--routes", action="store_true", help="compare the candidate routes on Q4_K instead")
    parser.add_argument("--inductor", action="store_true", help="with --routes: also torch.compile (slow)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ext = load_extension() if args.build == "native" else compile_extension(BUILDS[args.build])
    cpu_api.load_extension = lambda: ext  # this process times the chosen build
    if ext is None:
        raise SystemExit("the C++ CPU kernels did not build; nothing to benchmark")
    gen = torch.Generator().manual_seed(0)
    timer = "thread CPU time" if clock() is time.thread_time else "wall time"
    print(f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads ({timer}), kernels {ext.isa}, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}")
    rows = [int(m) for m in args.rows.split(",")]
    if args.routes:
        bench_routes(gen, rows, args.min_seconds, args.inductor)
        return
    exact_header = (" exact ms | exact GB/s | exact / int8 |", "---|---|---|") if args.exact else ("", "")
    print("| type | N x K | M | ms | GB/s | torch ref ms | speed-up | fp32 GEMV ms | fp32 GB/s | GB/s vs fp32 |"
          + exact_header[0])
    print("|---|---|---|---|---|---|---|---|---|---|" + exact_header[1])
    for name in args.types.split(","):
        for shape in SHAPES:
            bench_type(Q[name], shape, rows, gen, args.min_seconds, args.exact)
    for tokens in rows:
        for exact in (False, True) if args.exact else (False,):
            print(bench_expert(gen, tokens, args.min_seconds, exact))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
