"""Decode attention of one token on the CPU in one compiled call, over the KV cache in place.

The torch version is about ten small ops a layer, two of them batched matmuls that open
parallel regions; on a loaded machine each region's join can wait a scheduler time slice.
"""

import torch

from moestream.kernels.cpu.build import load_extension


def attends_in_place(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `cpu_attend_one` takes these: float32 CPU tensors, q [1, H, hd], k and v
    [ctx, KV, hd] with each slot's heads contiguous (a slice of the cache) and one stride."""
    if load_extension() is None or q.device.type != "cpu":
        return False
    if any(t.dtype != torch.float32 or t.dim() != 3 for t in (q, k, v)) or q.shape[0] != 1:
        return False
    ctx, n_kv, hd = k.shape
    if ctx < 1 or v.shape != k.shape or q.shape[2] != hd or q.shape[1] % n_kv:
        return False
    return k.stride()[1:] == (hd, 1) and v.stride() == k.stride()


def cpu_attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v for one query token -> [1, H, hd] float32; q [1, H, hd],
    k and v [ctx, KV, hd] (query head h reads KV head h // (H / KV)). Every cached slot is
    attended: the caller passes the context, the new token included. fp32 throughout; the
    sums run in a different order than torch's matmuls (agreement to fp32 rounding)."""
    if not attends_in_place(q, k, v):
        raise ValueError(f"cpu_attend_one needs float32 CPU q [1, H, hd] and k, v [ctx >= 1, KV, hd] with contiguous "
                         f"heads; got q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} stride {k.stride()}")
    ctx, n_kv, hd = k.shape
    H = q.shape[1]
    q = q.contiguous()
    out = torch.empty(1, H, hd)
    load_extension().attend_one(q.data_ptr(), H, hd, k.data_ptr(), v.data_ptr(), ctx, n_kv, k.stride(0),
                                hd**-0.5, out.data_ptr())
    return out
