"""Decode attention of one token on the CPU in one compiled call, over the KV cache in place.

The torch version is about ten small ops a layer, two of them batched matmuls that open
parallel regions; on a loaded machine each region's join can wait a scheduler time slice.
"""

import torch

from moestream.kernels.cpu.build import load_extension


def has_compiled_attention() -> bool:
    """Whether the compiled attention entries run here (False: no compiler, use torch)."""
    return load_extension() is not None


def _reads_in_place(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_dtypes: tuple[torch.dtype, ...]) -> bool:
    if not has_compiled_attention() or q.device.type != "cpu" or q.dtype != torch.float32 or q.dim() != 3:
        return False
    if k.dim() != 3 or k.dtype not in cache_dtypes or v.dtype != k.dtype or q.shape[0] != 1:
        return False
    ctx, n_kv, hd = k.shape
    if ctx < 1 or v.shape != k.shape or q.shape[2] != hd or q.shape[1] % n_kv:
        return False
    return k.stride()[1:] == (hd, 1) and v.stride() == k.stride()


def attends_in_place(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `cpu_attend_one` takes these: float32 CPU tensors, q [1, H, hd], k and v
    [ctx, KV, hd] with each slot's heads contiguous (a slice of the cache) and one stride."""
    return _reads_in_place(q, k, v, (torch.float32,))


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


def cpu_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_ctx: torch.Tensor,
                         v_ctx: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], neox: bool,
                         qk_norm: tuple[torch.Tensor, torch.Tensor, bool] | None = None,
                         eps: float = 0.0) -> torch.Tensor:
    """A decode token's attention from its projections, in one compiled call -> [1, H, hd].

    q [1, H, hd], k and v [1, KV, hd] (float32, as the projections gave them); qk_norm:
    (q weight, k weight, per_head) of an RMSNorm over all heads ([H * hd], [KV * hd]) or
    per head ([hd]), or None; rope: cos and signed sin [rope_dims] (the sine negated at each
    pair's first value), applied to each head's first rope_dims values (adjacent pairs, or
    halves when `neox`); k_ctx, v_ctx [ctx, KV, hd]: the context's KV cache slots, the new
    token's last, where its k and v are written (fp32, or fp16 rounded to nearest as
    torch's .to does; attention reads them back as fp32). q and k are normed and roped in place.
    """
    H, hd = q.shape[1], q.shape[2]
    cos, signed_sin = (t.reshape(-1) for t in rope)
    cache_ok = _reads_in_place(q, k_ctx, v_ctx, (torch.float32, torch.float16))
    if not (cache_ok and k.shape == v.shape == (1, *k_ctx.shape[1:])
            and all(t.dtype == torch.float32 and t.is_contiguous() for t in (q, k, v, cos, signed_sin))
            and cos.shape == signed_sin.shape and cos.numel() <= hd and cos.numel() % 2 == 0):
        raise ValueError("cpu_decode_attention needs contiguous float32 q [1, H, hd], k and v [1, KV, hd], "
                         "rope tables of at most hd values and an fp32 or fp16 KV cache slice [ctx, KV, hd]")
    n_kv = k.shape[1]
    q_norm = k_norm = None
    per_head = False
    if qk_norm is not None:
        q_norm, k_norm, per_head = qk_norm
        sizes = (hd, hd) if per_head else (H * hd, n_kv * hd)
        if (q_norm.numel(), k_norm.numel()) != sizes or q_norm.dtype != torch.float32 or k_norm.dtype != torch.float32:
            raise ValueError(f"q/k norm weights must be float32 of {sizes} values")
        q_norm, k_norm = q_norm.contiguous(), k_norm.contiguous()
    out = torch.empty(1, H, hd)
    load_extension().decode_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), H, n_kv, hd,
        q_norm.data_ptr() if q_norm is not None else 0, k_norm.data_ptr() if k_norm is not None else 0,
        per_head, eps, cos.data_ptr(), signed_sin.data_ptr(), cos.numel(), neox,
        k_ctx.data_ptr(), v_ctx.data_ptr(), k_ctx.shape[0], k_ctx.stride(0), k_ctx.dtype == torch.float16,
        hd**-0.5, out.data_ptr())
    return out
