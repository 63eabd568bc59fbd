"""The compiled one-token decode attention against torch's scaled_dot_product_attention in
float64, on the KV cache's own layout (a slice of [slots, KV, hd] read in place); the whole
decode attention step and the add + RMSNorm between layer halves against float64 formulas."""

import pytest
import torch
import torch.nn.functional as F

from moestream.kernels.cpu import attends_in_place, cpu_add_rms_norm, cpu_attend_one, cpu_decode_attention
from moestream.kernels.cpu.build import load_extension

pytestmark = pytest.mark.skipif(load_extension() is None, reason="no C++ compiler: the CPU kernels did not build")


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.double().transpose(0, 1), k.double().transpose(0, 1),
                                         v.double().transpose(0, 1), enable_gqa=True)
    return out.transpose(0, 1)  # [1, H, hd]


# (H, KV, hd, ctx): MHA, GQA, an odd head size (tail lanes), and a context long enough for
# the heads to be split over threads
@pytest.mark.parametrize("H,KV,hd,ctx", [(16, 16, 128, 1), (16, 16, 128, 150), (32, 4, 128, 77),
                                          (8, 2, 72, 33), (16, 4, 128, 700)])
def test_matches_float64_sdpa_on_a_cache_slice(H, KV, hd, ctx):
    g = torch.Generator().manual_seed(H * 1000 + ctx)
    cache_k = torch.randn(2, ctx + 40, KV, hd, generator=g)  # [layers, slots, KV, hd]
    cache_v = torch.randn(2, ctx + 40, KV, hd, generator=g)
    q = torch.randn(1, H, hd, generator=g) * 3  # sharper softmax than unit scale
    k, v = cache_k[1, 5:5 + ctx], cache_v[1, 5:5 + ctx]  # views, as KVCache.read gives them
    assert attends_in_place(q, k, v)
    got = cpu_attend_one(q, k, v)
    want = _reference(q, k, v)
    assert got.shape == (1, H, hd) and got.dtype == torch.float32
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()  # fp32 rounding over ctx terms


def test_thread_count_does_not_change_the_result():
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(900, 4, 128, generator=g), torch.randn(900, 4, 128, generator=g)
    q = torch.randn(1, 16, 128, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_attend_one(q, k, v)
        torch.set_num_threads(2)
        two = cpu_attend_one(q, k, v)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_refuses_what_it_cannot_read_in_place():
    q, k = torch.randn(1, 8, 64), torch.randn(10, 2, 64)
    assert not attends_in_place(q.half(), k.half(), k.half())  # fp16 cache: the torch path
    assert not attends_in_place(q, k.transpose(0, 1).contiguous().transpose(0, 1), k)  # heads not contiguous
    assert not attends_in_place(torch.randn(2, 8, 64), k, k)  # two query tokens
    with pytest.raises(ValueError, match="cpu_attend_one needs"):
        cpu_attend_one(q, k[:, :, :32], k[:, :, :32])


def _rope_reference(x: torch.Tensor, positions_angle: torch.Tensor, dims: int, neox: bool) -> torch.Tensor:
    """Rotary embedding as complex multiplication (float64): pairs (x_2i, x_2i+1), or
    (x_i, x_i+dims/2) for NEOX, times e^(i angle_i); the values past `dims` unchanged."""
    head, tail = x[..., :dims], x[..., dims:]
    if neox:
        pairs = torch.stack([head[..., : dims // 2], head[..., dims // 2:]], dim=-1)
    else:
        pairs = head.unflatten(-1, (-1, 2))
    rotated = torch.view_as_real(torch.view_as_complex(pairs.contiguous()) * torch.polar(
        torch.ones_like(positions_angle), positions_angle))
    head = torch.cat([rotated[..., 0], rotated[..., 1]], -1) if neox else rotated.flatten(-2)
    return torch.cat([head, tail], dim=-1)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


# (H, KV, hd, rope dims, neox, q/k norm): OLMoE (full norm), Qwen3 (per head, NEOX), Mixtral
# (no norm), GLM-4.5 (partial NEOX rope)
@pytest.mark.parametrize("H,KV,hd,dims,neox,norm", [(16, 16, 128, 128, False, "full"), (32, 4, 128, 128, True, "head"),
                                                    (8, 2, 64, 64, False, None), (12, 4, 128, 64, True, "head")])
@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.float32])
def test_decode_attention_matches_float64_formulas(H, KV, hd, dims, neox, norm, cache_dtype):
    g = torch.Generator().manual_seed(H + dims)
    ctx, eps, position = 37, 1e-6, 36
    q, k, v = (torch.randn(1, n, hd, generator=g) for n in (H, KV, KV))
    cache_k = torch.randn(2, ctx + 9, KV, hd, generator=g).to(cache_dtype)
    cache_v = torch.randn(2, ctx + 9, KV, hd, generator=g).to(cache_dtype)
    k_ctx, v_ctx = cache_k[0, 4:4 + ctx], cache_v[0, 4:4 + ctx]
    sizes = {"full": (H * hd, KV * hd), "head": (hd, hd)}.get(norm)
    weights = tuple(1 + 0.3 * torch.randn(n, generator=g) for n in sizes) if sizes else None
    # angle of pair i at this position, with llama's base; tables laid out as engine.layers.Rope's
    inv_freq = 10000.0 ** (-torch.arange(0, dims, 2, dtype=torch.float64) / dims)
    angle = position * inv_freq
    per_value = torch.cat([angle, angle]) if neox else angle.repeat_interleave(2)
    first = (torch.arange(dims) < dims // 2) if neox else (torch.arange(dims) % 2 == 0)
    tables = (per_value.cos().float(), torch.where(first, -per_value.sin(), per_value.sin()).float())

    qd, kd, vd = q.double(), k.double(), v.double()
    if norm == "full":
        qd = _rms(qd.view(1, -1), weights[0].double(), eps).view_as(qd)
        kd = _rms(kd.view(1, -1), weights[1].double(), eps).view_as(kd)
    elif norm == "head":
        qd, kd = _rms(qd, weights[0].double(), eps), _rms(kd, weights[1].double(), eps)
    qd, kd = _rope_reference(qd, angle, dims, neox), _rope_reference(kd, angle, dims, neox)
    keys, values = k_ctx.double().clone(), v_ctx.double().clone()
    # the cache holds the new k and v in its own dtype, and attention reads them from there
    keys[-1], values[-1] = kd[0].to(cache_dtype).double(), vd[0].to(cache_dtype).double()
    want = _reference(qd, keys, values)

    untouched = cache_k.clone()
    got = cpu_decode_attention(q, k, v, k_ctx, v_ctx, tables, neox,
                               None if norm is None else (*weights, norm == "head"), eps)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    # the new token's k, normed and roped, rounded to the cache's dtype (one fp16 step apart
    # at most where fp32 rounding lands near a half-way point)
    step = 1e-3 if cache_dtype == torch.float16 else 1e-5
    assert (k_ctx[-1].double() - kd[0]).abs().max() <= step * kd.abs().max()
    assert torch.equal(v_ctx[-1], v[0].to(cache_dtype))
    written = 4 + ctx - 1  # the one slot the call may change
    assert torch.equal(cache_k[0, :written], untouched[0, :written]) and torch.equal(cache_k[1], untouched[1])


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rms_norm_matches_float64(rows, with_delta):
    g = torch.Generator().manual_seed(rows)
    h, delta = torch.randn(rows, 2048, generator=g) * 4, torch.randn(rows, 2048, generator=g)
    weight, eps = 1 + 0.2 * torch.randn(2048, generator=g), 1e-5
    h_out, x = cpu_add_rms_norm(h, delta if with_delta else None, weight, eps)
    hd = h.double() + (delta.double() if with_delta else 0)
    want = hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    assert torch.equal(h_out, h + delta if with_delta else h)  # the fp32 sum, as torch adds
    assert (x.double() - want).abs().max() <= 1e-6 * want.abs().max()
