import random

import pytest
import torch

from moestream.kernels.errors import MoestreamError
from moestream.offload import BudgetTooSmall, default_budget, kv_cache_bytes, parse_bytes, plan_placement


@pytest.mark.parametrize("text, expected", [
    ("1GiB", 1 << 30),
    ("6GB", 6_000_000_000),
    ("512MiB", 512 << 20),
    ("64M", 64 << 20),
    ("1.5 GiB", 3 << 29),
    ("2k", 2048),
    ("10kb", 10_000),
    ("4096", 4096),
    ("100B", 100),
    (" 3 tib ", 3 << 40),
    (123_456, 123_456),
    (0, 0),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    "text", ["", "GiB", "1.2.3G", "-1G", "6 parsecs", "1GiBs", "1e9", -5, None]
)
def test_parse_bytes_refuses_with_the_accepted_forms(text):
    with pytest.raises(MoestreamError, match="512MiB.*6GB.*64M"):
        parse_bytes(text)


def test_plan_never_exceeds_the_budget_and_takes_every_slot_that_fits():
    rng = random.Random(3)
    for _ in range(2000):
        resident, kv, work = (rng.randint(0, 4 << 30) for _ in range(3))
        slot = rng.randint(1 << 20, 64 << 20)
        n_total = rng.randint(8, 4096)
        cap = rng.choice([None, rng.randint(1, 5000)])
        budget = rng.randint(0, 12 << 30)
        fixed = resident + kv + work
        if budget < fixed + slot:
            with pytest.raises(BudgetTooSmall):
                plan_placement(budget, resident, kv, work, slot, n_total, cap)
            continue
        plan = plan_placement(budget, resident, kv, work, slot, n_total, cap)
        assert fixed + plan.n_slots * slot <= budget
        assert 1 <= plan.n_slots <= n_total and (cap is None or plan.n_slots <= cap)
        one_more_fits = fixed + (plan.n_slots + 1) * slot <= budget
        assert not one_more_fits or plan.n_slots in (n_total, cap)
        assert plan.used_bytes == fixed + plan.cache_bytes


def test_budget_too_small_names_the_minimum_and_the_knobs():
    resident, kv, work, slot = 900 << 20, 3 << 30, 256 << 20, 13_000_000
    minimum = resident + kv + work + slot
    with pytest.raises(BudgetTooSmall) as err:
        plan_placement(minimum - 1, resident, kv, work, slot, 1024)
    message = str(err.value)
    assert str(minimum) in message
    assert "--ctx-size" in message and "--max-batch" in message and "KV cache type" in message
    assert isinstance(err.value, MoestreamError)
    plan = plan_placement(minimum, resident, kv, work, slot, 1024)
    assert plan.n_slots == 1 and plan.min_budget_bytes == minimum


def test_plan_table_is_readable():
    plan = plan_placement(6 << 30, 1 << 30, 512 << 20, 256 << 20, 12 << 20, 1024)
    text = str(plan)
    assert plan.n_slots == (6 * 1024 - 1024 - 512 - 256) // 12
    assert f"{plan.n_slots} slots x 12.00 MiB" in text and "6.00 GiB" in text
    assert len(text.splitlines()) == 8


def test_everything_resident_when_the_budget_allows():
    plan = plan_placement(80 << 30, 1 << 30, 1 << 30, 1 << 30, 10 << 20, 1024)
    assert plan.n_slots == 1024 and plan.is_all_resident


def test_max_cached_experts_caps_slots():
    assert plan_placement(80 << 30, 0, 0, 0, 10 << 20, 1024, max_cached_experts=100).n_slots == 100
    with pytest.raises(MoestreamError):
        plan_placement(80 << 30, 0, 0, 0, 10 << 20, 1024, max_cached_experts=0)


def test_kv_cache_bytes_matches_the_tensors_it_sizes():
    n_layers, n_kv_heads, head_dim, n_tokens = 16, 8, 128, 4096
    k = torch.empty((n_layers, n_tokens, n_kv_heads, head_dim), dtype=torch.float16, device="meta")
    shape = (n_layers, n_kv_heads, head_dim, n_tokens)
    assert kv_cache_bytes(*shape, 2) == 2 * k.numel() * k.element_size()
    assert kv_cache_bytes(*shape, 34 / 32) == 2 * k.numel() // 32 * 34  # q8_0: 34 B per 32


def test_default_budget_on_cpu_means_everything_resident():
    assert default_budget("cpu") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_default_budget_on_cuda_leaves_a_margin():
    free, _ = torch.cuda.mem_get_info()
    assert 0 <= default_budget("cuda") <= free - (512 << 20)
