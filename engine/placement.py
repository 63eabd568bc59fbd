"""From a GGUF file and a VRAM budget to an ExpertSource: the host store, and a device
expert cache sized by the placement planner when a budget applies."""

from __future__ import annotations

import logging
import torch

from moestream.engine.calibrate import measure_rates
from moestream.engine.engine_config import EngineConfig
from moestream.engine.loader import GGUFModelFile
from moestream.engine.memory_plan import ACTIVATION_DTYPE, MemoryPlan
from moestream.engine.model import expert_ffn
from moestream.kernels.errors import MoestreamError
from moestream.offload.cache import ExpertCache
from moestream.offload.copier import LinkCopier
from moestream.offload.hybrid import MissPolicy
from moestream.offload.layout import ExpertLayout, ProjLayout
from moestream.offload.planner import default_budget, parse_bytes
from moestream.offload.source import ExpertSource
from moestream.offload.store import HostExpertStore

log = logging.getLogger(__name__)

_EXPERT_PARTS = ("gate", "up", "down")


def expert_layout(file: GGUFModelFile, layer: int) -> ExpertLayout:
    tensors = [file.tensor(f"blk.{layer}.ffn_{p}_exps.weight") for p in _EXPERT_PARTS]
    return ExpertLayout(*(ProjLayout.of(t.qtype, t.dims[1], t.dims[2]) for t in tensors))


def expert_layers(file: GGUFModelFile) -> dict[int, tuple]:
    """{layer: (ExpertLayout, gate, up, down)} with each part as uint8 [n_expert, bytes], for
    the layers with routed experts (not the leading dense ones)."""
    layers = {}
    for i in file.config.moe_layers:
        tensors = [file.tensor(f"blk.{i}.ffn_{p}_exps.weight") for p in _EXPERT_PARTS]
        arrays = [t.as_bytes().reshape(t.dims[0], -1) for t in tensors]
        layers[i] = (expert_layout(file, i), *arrays)
    return layers


def device_budget(config: EngineConfig) -> int | None:
    """The VRAM budget: --vram-budget, else (CUDA) free device memory minus a margin, read
    before anything is allocated; None on the CPU without one (no expert cache)."""
    if config.vram_budget is not None:
        return parse_bytes(config.vram_budget)
    return default_budget(config.device)


def build_expert_source(file: GGUFModelFile, config: EngineConfig, plan: MemoryPlan) -> ExpertSource:
    """The host store, behind a device cache of `plan.n_slots` slots when the plan has one."""
    device = torch.device(config.device)
    policy = MissPolicy.parse(config.miss_policy)  # a bad name fails even where no cache is built
    store = HostExpertStore(expert_layers(file), pinned=device.type == "cuda" and config.pin_memory)
    if not plan.has_cache:
        return store  # CPU, everything resident in host memory: no copies at all
    link = _simulated_link(config, device)
    rates = None
    if policy is MissPolicy.AUTO:
        rates = measure_rates(store, device, lambda x, w: expert_ffn(x, w, config.kernel_backend), ACTIVATION_DTYPE,
                              exact=config.kernel_backend != "q8",
                              link_bytes_per_s=link.bytes_per_s if link else None)
    return ExpertCache(store, plan.n_slots, device, policy, rates, copier=link)


def _simulated_link(config: EngineConfig, device: torch.device) -> LinkCopier | None:
    if config.simulate_link_gbps is None:
        return None
    if device.type != "cpu":
        raise MoestreamError("a simulated host->device link is for machines without a GPU: "
                             "drop simulate_link_gbps on a CUDA device")
    return LinkCopier(config.simulate_link_gbps * 1e9)
