import random
import re

import pytest
import torch

from moestream.kernels.errors import MoestreamError
from moestream.offload import default_budget, fit_slots, parse_bytes
from moestream.offload.planner import MIN_FREE_BYTES, slots_after_measurement, too_small_advice


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


def test_slots_never_exceed_the_budget_and_take_every_slot_that_fits():
    rng = random.Random(3)
    for _ in range(2000):
        fixed = sum(rng.randint(0, 4 << 30) for _ in range(3))
        slot = rng.randint(1 << 20, 64 << 20)
        n_total = rng.randint(8, 4096)
        cap = rng.choice([None, rng.randint(1, 5000)])
        budget = rng.randint(0, 12 << 30)
        n_slots = fit_slots(budget, fixed, slot, n_total, cap)
        if budget < fixed + slot:
            assert n_slots == 0
            continue
        assert fixed + n_slots * slot <= budget
        assert 1 <= n_slots <= n_total and (cap is None or n_slots <= cap)
        one_more_fits = fixed + (n_slots + 1) * slot <= budget
        assert not one_more_fits or n_slots in (n_total, cap)


def test_budget_too_small_names_the_minimum_and_only_flags_that_exist():
    from moestream.server.cli import build_parser

    resident, kv, work, slot = 900 << 20, 3 << 30, 256 << 20, 13_000_000
    minimum = resident + kv + work + slot
    message = too_small_advice(minimum - 1, resident, kv, work, slot)
    assert str(minimum) in message
    flags = set(re.findall(r"--[a-z][a-z-]+", message))
    assert {"--vram-budget", "--kv-tokens", "--ctx-size", "--kv-dtype"} <= flags
    sub = build_parser()._subparsers._group_actions[0].choices
    for command in ("inspect", "generate", "serve"):
        known = {o for a in sub[command]._actions for o in a.option_strings}
        assert flags <= known, (command, flags - known)


def test_max_cached_experts_caps_slots():
    assert fit_slots(80 << 30, 0, 10 << 20, 1024, max_cached_experts=100) == 100
    assert fit_slots(80 << 30, 0, 10 << 20, 1024) == 1024
    with pytest.raises(MoestreamError):
        fit_slots(80 << 30, 0, 10 << 20, 1024, max_cached_experts=0)


@pytest.mark.parametrize("reserved, free, expected", [
    (4 << 30, 2 << 30, 100),  # at the budget, room on the device: nothing changes
    ((4 << 30) + 1, 2 << 30, 99),  # one byte over: one slot goes
    ((4 << 30) + (25 << 20), 2 << 30, 97),  # 25 MiB over, 10 MiB slots: three go
    (4 << 30, MIN_FREE_BYTES - (15 << 20), 98),  # the device is short of free memory: two go
    (80 << 30, 0, 1),  # far over: down to one slot, never zero
])
def test_a_measurement_over_budget_means_fewer_slots(reserved, free, expected):
    assert slots_after_measurement(100, 10 << 20, reserved, 4 << 30, free) == expected


def test_default_budget_on_cpu_means_everything_resident():
    assert default_budget("cpu") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_default_budget_on_cuda_leaves_a_margin():
    free, _ = torch.cuda.mem_get_info()
    assert 0 <= default_budget("cuda") <= free - (512 << 20)
