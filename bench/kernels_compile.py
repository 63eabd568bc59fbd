"""Compile the Triton kernels for NVIDIA targets without a GPU: `python -m bench.kernels_compile`.

Builds every kernel x type at the configs kernels/triton_configs.py selects for each
compute capability, with the installed Triton, then runs its bundled ptxas with -v on the
PTX and prints registers, stack frame and spill stores/loads per build. It catches what the
interpreter cannot: code the compiler rejects, register spills of a tile choice, and
(through alignment specialization) whether byte loads vectorize. Exits 1 when a build
fails, spills or needs a stack frame. Assumes 16-byte-aligned rows and strides, as in real
models.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

os.environ.pop("TRITON_INTERPRET", None)  # compile for real; must precede the kernel imports

import triton  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from moestream.kernels.formats import block_format  # noqa: E402
from moestream.kernels.triton_configs import CAPABILITIES, tile_config  # noqa: E402
from moestream.kernels.triton_configs import TRITON_QTYPES  # noqa: E402
from moestream.kernels.triton_gemm import _gemm_kernel  # noqa: E402
from moestream.kernels.triton_gemv import _gemv_kernel, gemv_block_n  # noqa: E402
from moestream.kernels.triton_moe import _grouped_kernel  # noqa: E402

_INDEX_POINTERS = ("slot_of_expert_ptr", "sorted_ids_ptr", "expert_ids_ptr", "num_post_pad_ptr")
_ALIGNED_INTS = ("K", "row_bytes", "stride_xm", "stride_om", "stride_split", "slot_stride", "weight_offset")
# Activation rows per build: GEMV at 1 and 4 rows (decode), GEMM and grouped at both row tiles.
BUILD_ROWS = {"gemv": (1, 4), "gemm": (16, 64), "grouped": (16, 64)}
_KERNELS = {"gemv": _gemv_kernel, "gemm": _gemm_kernel, "grouped": _grouped_kernel}


@dataclass(frozen=True)
class Build:
    capability: int
    kernel: str
    qtype: Q
    block: str  # BLOCK_M x BLOCK_N x BLOCK_K / warps
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int

    @property
    def fits(self) -> bool:
        return self.stack_bytes == self.spill_store_bytes == self.spill_load_bytes == 0


def _signature(fn, qtype: Q, activation: str, constexprs: dict) -> tuple[dict, dict]:
    """Argument types as the launcher passes them; 16-byte divisibility for pointers and strides."""
    table = "i8" if qtype in (Q.IQ4_XS, Q.IQ4_NL, Q.IQ1_S, Q.IQ1_M) else "u8"
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


def build(kind: str, qtype: Q, block_m: int, capability: int) -> Build:
    """Compile `kind` for `block_m` activation rows of `qtype` at the table's config."""
    config = tile_config(capability, kind, block_m, qtype)
    block_n = gemv_block_n(config, block_m) if kind == "gemv" else config.block_n
    constexprs = {"QTYPE": int(qtype), "TYPE_SIZE": block_format(qtype).type_size,
                  "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": config.block_k}
    if kind == "grouped":
        constexprs["APPLY_WEIGHTS"] = True
    fn = _KERNELS[kind]
    types, attrs = _signature(fn, qtype, "fp16", constexprs)
    source = ASTSource(fn, types, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    usage = ptxas_usage(compiled.asm["ptx"], capability)
    block = f"{block_m}x{block_n}x{config.block_k}/{config.num_warps}w"
    return Build(capability, fn.__name__.strip("_"), qtype, block, *usage)


def ptxas_usage(ptx: str, capability: int) -> tuple[int, int, int, int]:
    """(registers, stack frame, spill store, spill load bytes) from `ptxas -v` on `ptx`, run
    by the ptxas Triton picks for `capability` (its newer one from sm_90 on) for the PTX's
    own target (sm_90a, not sm_90, where Triton uses Hopper-only instructions)."""
    target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.MULTILINE)
    if target is None:
        raise RuntimeError("Triton's PTX names no .target")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={target.group(1)}", src,
                              "-o", os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True, check=True)
    log = run.stdout + run.stderr
    registers = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or frame is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return (int(registers.group(1)), *(int(v) for v in frame.groups()))


def builds_for(qtype: Q, capability: int) -> list[Build]:
    """Every kernel at the configs the launchers choose for `capability`."""
    return [build(kind, qtype, block_m, capability) for kind, rows in BUILD_ROWS.items() for block_m in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", help="comma-separated GGUF types (default: every Triton type)")
    parser.add_argument("--arch", default=",".join(map(str, CAPABILITIES)),
                        help="comma-separated compute capabilities x10 (default: every one in the table)")
    parser.add_argument("--json", help="also write every build's figures to this file")
    args = parser.parse_args(argv)
    qtypes = [Q[name] for name in args.types.split(",")] if args.types else sorted(TRITON_QTYPES, key=int)
    print(f"triton {triton.__version__}")
    print(f"{'sm':>3} {'kernel':>14} {'type':>8} {'tile':>16} {'regs':>5} {'stack':>6} {'spill st':>9} {'spill ld':>9}")
    builds = []
    for capability in (int(a) for a in args.arch.split(",")):
        for qtype in qtypes:
            for b in builds_for(qtype, capability):
                builds.append(b)
                print(f"{b.capability:>3} {b.kernel:>14} {b.qtype.name:>8} {b.block:>16} {b.registers:>5} "
                      f"{b.stack_bytes:>6} {b.spill_store_bytes:>9} {b.spill_load_bytes:>9}", flush=True)
    spilled = [b for b in builds if not b.fits]
    print(f"{len(spilled)} builds spill registers or use a stack frame" if spilled else "all builds fit in registers")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(b) | {"qtype": b.qtype.name} for b in builds], f, indent=1)
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
