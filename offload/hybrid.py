"""What to do with an expert cache miss: copy the expert into a device slot, or compute it on
the CPU where its bytes already are (Fiddler's observation: for a few tokens, reading the
expert from DRAM once costs about what copying it over PCIe costs, and no slot is spent).

Per layer and step the misses are split between the two sides, which run at the same time:
the device side copies its misses (one link, one after another) and computes hits and copied
experts; the CPU side computes its misses from host memory. The split is a greedy makespan
balance fed by measured rates (`Rates`): each miss, heaviest first, goes to the side whose
finish time grows least, a copy being credited with the copy it saves next time when the
expert is hit again (probability: the cache's recent hit rate).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from moestream.kernels.errors import MoestreamError


class MissPolicy(enum.Enum):
    AUTO = "auto"  # the cost model chooses per miss, per step
    COPY = "copy"  # every miss is copied into a slot (a plain LRU cache)
    CPU = "cpu"  # every miss is computed on the CPU; the slots hold a fixed set (llama.cpp --n-cpu-moe)

    @classmethod
    def parse(cls, value: str | MissPolicy) -> MissPolicy:
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(p.value for p in cls)
            raise MoestreamError(f"unknown miss policy {value!r}: choose one of {choices}") from None


@dataclass
class Rates:
    """Measured costs on this machine (engine.calibrate measures them at start-up)."""

    h2d_bytes_per_s: float  # host -> device copy of an expert blob into a slot
    cpu_s_per_byte: float  # CPU kernels, an expert's first token: reading its weights once
    cpu_s_per_byte_token: float  # each further token routed to the same expert
    device_s_per_expert: float  # computing one expert from its slot on the device

    def copy_s(self, nbytes: int) -> float:
        return nbytes / self.h2d_bytes_per_s

    def cpu_s(self, nbytes: int, n_tokens: int) -> float:
        return nbytes * (self.cpu_s_per_byte + self.cpu_s_per_byte_token * max(0, n_tokens - 1))

    def correct_cpu(self, predicted_s: float, measured_s: float, weight: float = 0.1) -> None:
        """Move the CPU costs toward what a CPU job really took (the box's load changes)."""
        if predicted_s > 0 and measured_s > 0:
            factor = 1 + weight * (measured_s / predicted_s - 1)
            self.cpu_s_per_byte *= factor
            self.cpu_s_per_byte_token *= factor


@dataclass(frozen=True)
class MissSplit:
    copy: tuple[int, ...]  # experts to copy into slots and compute on the device
    cpu: tuple[int, ...]  # experts to compute on the CPU from host memory


def split_misses(
    misses: Mapping[int, int],
    expert_bytes: int,
    rates: Rates,
    *,
    n_hits: int,
    free_slots: int,
    p_reuse: float,
    link_busy_s: float = 0.0,
) -> MissSplit:
    """Split `misses` {expert: tokens routed to it} between copy and CPU compute.

    n_hits: experts of this step already in slots (device work that runs anyway).
    free_slots: slots a copy can claim now without waiting for compute; beyond them a copy
    would wait a whole wave, so the rest go to the CPU.
    p_reuse: the chance a copied expert is hit before it is evicted.
    link_busy_s: copies already queued on the link (prefetches) that this step's copies follow.
    """
    device_s = n_hits * rates.device_s_per_expert
    link_s = link_busy_s
    cpu_s = 0.0
    copy, cpu = [], []
    copy_s = rates.copy_s(expert_bytes)
    # heaviest first (most tokens: the CPU's cost grows with them, a copy's does not)
    for expert, n_tokens in sorted(misses.items(), key=lambda item: (-item[1], item[0])):
        on_cpu = rates.cpu_s(expert_bytes, n_tokens)
        now = max(device_s + link_s, cpu_s)
        grow_copy = max(device_s + rates.device_s_per_expert + link_s + copy_s, cpu_s) - now
        # a hit next time saves the cheaper of the two ways of serving a miss
        grow_copy -= p_reuse * min(copy_s, on_cpu)
        grow_cpu = max(device_s + link_s, cpu_s + on_cpu) - now
        if len(copy) < free_slots and grow_copy <= grow_cpu:
            copy.append(expert)
            device_s += rates.device_s_per_expert
            link_s += copy_s
        else:
            cpu.append(expert)
            cpu_s += on_cpu
    return MissSplit(tuple(copy), tuple(cpu))


class RunningRate:
    """An exponential moving average (the cache's recent hit rate, the copies' p_reuse)."""

    def __init__(self, initial: float, weight: float = 0.05):
        self.value, self.weight = initial, weight

    def update(self, sample: float) -> float:
        self.value += self.weight * (sample - self.value)
        return self.value
