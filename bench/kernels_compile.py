"""Compile the Triton kernels for an NVIDIA target without a GPU: `python -m bench.kernels_compile`.

Builds every kernel x type at the GPU configs the launchers pick, with the installed Triton
and its bundled ptxas, and prints registers and spill bytes per build (cuobjdump). It
catches what the interpreter cannot: code the compiler rejects, register spills of a tile
choice, and (through alignment specialization) whether byte loads vectorize. Exits 1 when a
build fails or spills. Assumes 16-byte-aligned rows and strides, as in real models.
"""

import argparse
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

os.environ.pop("TRITON_INTERPRET", None)  # compile for real; must precede the kernel imports

import triton  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from moestream.kernels.formats import block_format  # noqa: E402
from moestream.kernels.triton_dequant_tiles import TRITON_QTYPES  # noqa: E402
from moestream.kernels.triton_gemm import _gemm_kernel, gpu_gemm_config  # noqa: E402
from moestream.kernels.triton_gemv import _gemv_kernel, gpu_gemv_config  # noqa: E402
from moestream.kernels.triton_moe import _grouped_kernel, gpu_grouped_config  # noqa: E402

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_INDEX_POINTERS = ("slot_of_expert_ptr", "sorted_ids_ptr", "expert_ids_ptr", "num_post_pad_ptr")
_ALIGNED_INTS = ("K", "row_bytes", "stride_xm", "stride_om", "stride_split", "slot_stride", "weight_offset")


@dataclass(frozen=True)
class Build:
    kernel: str
    qtype: Q
    block: str  # BLOCK_M x BLOCK_N x BLOCK_K / warps
    registers: int
    spill_bytes: int


def _signature(fn, qtype: Q, activation: str, constexprs: dict) -> tuple[dict, dict]:
    """Argument types as the launcher passes them; 16-byte divisibility for pointers and strides."""
    table = "i8" if qtype == Q.IQ4_XS else "u8"
    pointer = {"x_ptr": activation, "out_ptr": activation, "table_ptr": table, "topk_weights_ptr": "fp32"}
    pointer |= {name: "i32" for name in _INDEX_POINTERS}
    types, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            types[name] = "*" + pointer.get(name, "u8")
        else:
            types[name] = "i32"
        if name.endswith("_ptr") or name in _ALIGNED_INTS:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return types, attrs


def build(fn, qtype: Q, constexprs: dict, num_warps: int, num_stages: int, arch: int) -> Build:
    constexprs = {"QTYPE": int(qtype), "TYPE_SIZE": block_format(qtype).type_size, **constexprs}
    types, attrs = _signature(fn, qtype, "fp16", constexprs)
    source = ASTSource(fn, types, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    registers, spill = _resource_usage(compiled.asm["cubin"])
    block = "x".join(str(constexprs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) + f"/{num_warps}w"
    return Build(fn.__name__.strip("_"), qtype, block, registers, spill)


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of the kernel from cuobjdump's resource summary."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([os.path.join(_BIN, "cuobjdump"), "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    fields = dict(item.split(":") for item in text.split("Resource usage:")[1].split() if ":" in item)
    return int(fields["REG"]), int(fields["STACK"])


def builds_for(qtype: Q, arch: int) -> list[Build]:
    """The GPU configs the launchers choose: decode rows 1 and 4, prefill and MoE row tiles."""
    out = []
    for m in (1, 4):
        c = gpu_gemv_config(m, 4096, 4096, n_sm=132)
        out.append(build(_gemv_kernel, qtype, dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k),
                         c.num_warps, 1, arch))
    for block_m in (16, 64):
        c = gpu_gemm_config(block_m)
        out.append(build(_gemm_kernel, qtype, dict(BLOCK_M=block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k),
                         c.num_warps, c.num_stages, arch))
        g = gpu_grouped_config(block_m)
        out.append(build(_grouped_kernel, qtype, dict(BLOCK_M=block_m, BLOCK_N=g.block_n, BLOCK_K=g.block_k,
                                                      APPLY_WEIGHTS=True), g.num_warps, g.num_stages, arch))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", help="comma-separated GGUF types (default: every Triton type)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90: H100)")
    args = parser.parse_args(argv)
    qtypes = [Q[name] for name in args.types.split(",")] if args.types else sorted(TRITON_QTYPES, key=int)
    print(f"triton {triton.__version__}, target sm_{args.arch}")
    print(f"{'kernel':>14} {'type':>8} {'tile':>16} {'regs':>5} {'spill B':>8}")
    spilled = []
    for qtype in qtypes:
        for b in builds_for(qtype, args.arch):
            print(f"{b.kernel:>14} {b.qtype.name:>8} {b.block:>16} {b.registers:>5} {b.spill_bytes:>8}", flush=True)
            if b.spill_bytes:
                spilled.append(b)
    print(f"{len(spilled)} builds spill registers" if spilled else "all builds fit in registers")
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
