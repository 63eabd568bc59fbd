"""The residual add and RMSNorm between a layer's halves in one compiled call (CPU, fp32)."""

import torch

from moestream.kernels.cpu.build import load_extension


def cpu_add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, RMSNorm(h + delta) * weight) over the last dim (delta None: h itself
    and its norm), float32 [..., D]. The mean of squares sums in double: agreement with
    torch's rms_norm to fp32 rounding. Needs the compiled kernels (has_compiled_attention)."""
    D = h.shape[-1]
    tensors = (h, weight) if delta is None else (h, delta, weight)
    if (any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors) or weight.shape != (D,)
            or (delta is not None and delta.shape != h.shape)):
        raise ValueError(f"cpu_add_rms_norm needs float32 CPU h [..., {D}], delta of h's shape and weight [{D}]")
    h = h.contiguous()
    delta = delta.contiguous() if delta is not None else None
    weight = weight.contiguous()
    h_out = torch.empty_like(h) if delta is not None else h
    x_out = torch.empty_like(h)
    load_extension().add_rms_norm(h.data_ptr(), delta.data_ptr() if delta is not None else 0, weight.data_ptr(),
                                  h.numel() // D, D, eps, h_out.data_ptr(), x_out.data_ptr())
    return h_out, x_out
