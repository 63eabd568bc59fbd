"""Measure the rates the hybrid miss policy decides with (offload/hybrid.py), at start-up.

A few real experts of the first MoE layer are timed on this machine: copied into a device
buffer (host -> device), computed from there (device), and computed on the CPU straight from
host memory for 1 and for 8 tokens each (the CPU's cost per byte, and per extra token).
Each figure is the best of a few repeats, after one warm-up, so a momentary stall of a
shared box does not skew the start. The CPU figures are corrected as the engine runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from moestream.kernels.cpu import cpu_moe_layer
from moestream.offload.copier import copy_runs
from moestream.offload.hybrid import Rates
from moestream.offload.layout import ExpertWeights
from moestream.offload.store import HostExpertStore

log = logging.getLogger(__name__)

DeviceExpert = Callable[[torch.Tensor, ExpertWeights], torch.Tensor]
N_EXPERTS = 4
MANY_TOKENS = 8
REPEATS = 3


def measure_rates(store: HostExpertStore, device: torch.device, run_device: DeviceExpert,
                  dtype: torch.dtype, exact: bool, link_bytes_per_s: float | None = None) -> Rates:
    """Rates of this machine. link_bytes_per_s: a simulated link's rate (taken as given)."""
    layer = store.layers[0]
    layout = store.layout(layer)
    experts = list(range(min(N_EXPERTS, store.n_experts)))
    d_model = layout.gate.shape[1]
    buffers = [torch.empty(layout.expert_bytes, dtype=torch.uint8, device=device) for _ in experts]

    def copy_all() -> None:
        for e, buf in zip(experts, buffers):
            copy_runs(buf, store.blob_parts(layer, e), non_blocking=True)

    copy_s = _best(copy_all, device)
    x = torch.randn(MANY_TOKENS, d_model, generator=torch.Generator().manual_seed(0))
    x_dev = x[:1].to(device, dtype)
    slots = [ExpertWeights.from_blob(layout, buf) for buf in buffers]
    device_s = _best(lambda: [run_device(x_dev, w) for w in slots], device)
    host = [(e, *store.weights(layer, e).parts) for e in experts]
    qtypes = (layout.gate.qtype, layout.up.qtype, layout.down.qtype)

    def on_cpu(n: int) -> float:
        ids = torch.tensor(experts).repeat(n, 1)  # every token to every expert: n tokens each
        weights = torch.ones(ids.shape)
        return _best(lambda: cpu_moe_layer(x[:n], ids, weights, host, qtypes, layout.gate.shape[0], exact),
                     torch.device("cpu"))

    nbytes = len(experts) * layout.expert_bytes
    one, many = on_cpu(1), on_cpu(MANY_TOKENS)
    rates = Rates(
        h2d_bytes_per_s=link_bytes_per_s or nbytes / copy_s,
        cpu_s_per_byte=one / nbytes,
        cpu_s_per_byte_token=max(0.0, many - one) / (MANY_TOKENS - 1) / nbytes,
        device_s_per_expert=device_s / len(experts),
    )
    log.info("hybrid miss policy rates: host->device %.2f GB/s, CPU %.2f GB/s for one token "
             "(+%.0f%% per extra token), device %.3f ms per expert", rates.h2d_bytes_per_s / 1e9,
             1e-9 / rates.cpu_s_per_byte, 100 * rates.cpu_s_per_byte_token / rates.cpu_s_per_byte,
             1e3 * rates.device_s_per_expert)
    return rates


def _best(work: Callable[[], object], device: torch.device) -> float:
    """The fastest of REPEATS timed runs of `work` (after a warm-up), waiting for the device."""
    times = []
    for _ in range(REPEATS + 1):
        _sync(device)
        start = time.perf_counter()
        work()
        _sync(device)
        times.append(time.perf_counter() - start)
    return max(min(times[1:]), 1e-9)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
