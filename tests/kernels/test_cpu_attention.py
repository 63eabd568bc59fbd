"""The compiled one-token decode attention against torch's scaled_dot_product_attention in
float64, on the KV cache's own layout (a slice of [slots, KV, hd] read in place)."""

import pytest
import torch
import torch.nn.functional as F

from moestream.kernels.cpu import attends_in_place, cpu_attend_one
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
