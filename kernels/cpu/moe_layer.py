"""All routed experts of one MoE layer in one compiled call (CPU, straight from GGUF bytes).

`cpu_moe_layer` gives bitwise the numbers of calling `cpu_expert_ffn` once per expert on its
tokens (rows in token order, as `nonzero` lists them) and scaling each (token, k) result by
its routing weight: the same jobs run on the same activation rows, but gate and up of every
expert form one parallel region and down a second, and Python is paid once per layer
instead of once per expert.
"""

from collections.abc import Sequence

import torch
from gguf import GGMLQuantizationType

from moestream.kernels.cpu.build import load_extension
from moestream.kernels.cpu.qmatmul import cpu_expert_ffn, has_cpu_kernel
from moestream.kernels.formats import row_bytes

# (expert id, gate, up, down): the raw GGUF bytes of one routed expert's projections.
LayerExpert = tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]


def cpu_moe_layer(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    experts: Sequence[LayerExpert],
    qtypes: tuple[GGMLQuantizationType, GGMLQuantizationType, GGMLQuantizationType],
    intermediate: int,
    exact: bool = False,
) -> torch.Tensor:
    """out [T, k, D] float32: out[t, j] = topk_weights[t, j] * FFN_{topk_ids[t, j]}(x[t]).

    x [T, D]; topk_ids [T, k] integer, topk_weights [T, k]; `experts` holds every expert
    named in topk_ids exactly once (gate and up W [intermediate, D], down W [D, intermediate]).
    exact as in `cpu_expert_ffn`. Summing out over k is left to the caller (a fixed order).
    """
    T, d_model = x.shape
    x = _float_rows(x, d_model)
    ids = topk_ids.to(torch.int64).contiguous()
    weights = topk_weights.to(torch.float32).contiguous()
    if ids.shape != weights.shape or ids.shape[0] != T or not ids.is_cpu or not weights.is_cpu:
        raise ValueError(f"topk_ids and topk_weights must both be CPU [{T}, k], "
                         f"got {tuple(ids.shape)} and {tuple(weights.shape)}")
    sizes = _part_bytes(qtypes, intermediate, d_model)
    addresses = [(int(e), *(_address(p, n) for p, n in zip(parts, sizes))) for e, *parts in experts]
    if not all(has_cpu_kernel(q) for q in qtypes):
        return _per_expert(x, ids, weights, experts, qtypes, intermediate, exact)
    out = torch.empty(T, ids.shape[1], d_model)
    load_extension().moe_layer(x.data_ptr(), T, d_model, intermediate, ids.shape[1], ids.data_ptr(),
                               weights.data_ptr(), addresses, tuple(int(q) for q in qtypes), out.data_ptr(), exact)
    return out


def _per_expert(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: Sequence[LayerExpert],
                qtypes: tuple[GGMLQuantizationType, ...], intermediate: int, exact: bool) -> torch.Tensor:
    """The same numbers one expert at a time (types without a compiled kernel)."""
    given = [int(e) for e, *_ in experts]
    if sorted(given) != ids.unique().tolist():
        raise ValueError(f"experts {given} do not match the routed experts {ids.unique().tolist()} one to one")
    out = torch.empty(*ids.shape, x.shape[1])
    for e, gate, up, down in experts:
        tok, kth = (ids == e).nonzero(as_tuple=True)
        y = cpu_expert_ffn(x[tok], gate, up, down, qtypes, intermediate, exact)
        out[tok, kth] = y * weights[tok, kth, None]
    return out


def _float_rows(x: torch.Tensor, cols: int) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] != cols or not x.is_cpu:
        raise ValueError(f"expected a CPU tensor [T, {cols}], got {tuple(x.shape)} on {x.device}")
    return x.to(torch.float32).contiguous()  # no copy when it already is


def _part_bytes(qtypes: tuple[GGMLQuantizationType, ...], intermediate: int, d_model: int) -> tuple[int, int, int]:
    gate_type, up_type, down_type = qtypes
    return (intermediate * row_bytes(gate_type, d_model), intermediate * row_bytes(up_type, d_model),
            d_model * row_bytes(down_type, intermediate))


def _address(part: torch.Tensor, nbytes: int) -> int:
    """The address of one projection's bytes, after the checks the kernels rely on."""
    if part.dtype != torch.uint8 or part.numel() != nbytes or not part.is_cpu or not part.is_contiguous():
        raise ValueError(f"an expert projection needs {nbytes} contiguous uint8 bytes on the CPU, "
                         f"got {part.numel()} {part.dtype} on {part.device}")
    return part.data_ptr()
