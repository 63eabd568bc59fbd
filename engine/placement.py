"""From a GGUF file and a VRAM budget to an ExpertSource: the host store, and a device
expert cache sized by the placement planner when a budget applies."""

from __future__ import annotations

import logging
import torch

from moestream.engine.calibrate import measure_rates
from moestream.engine.engine_config import EngineConfig
from moestream.engine.loader import GGUFModelFile
from moestream.engine.model import expert_ffn
from moestream.kernels.errors import MoestreamError
from moestream.offload.cache import ExpertCache
from moestream.offload.copier import LinkCopier
from moestream.offload.hybrid import MissPolicy
from moestream.offload.layout import ExpertLayout, ProjLayout
from moestream.offload.planner import PlacementPlan, default_budget, parse_bytes, plan_placement
from moestream.offload.source import ExpertSource
from moestream.offload.store import HostExpertStore

log = logging.getLogger(__name__)

_EXPERT_PARTS = ("gate", "up", "down")


def is_routed_expert(name: str) -> bool:
    return name.endswith("_exps.weight")


def expert_layout(file: GGUFModelFile, layer: int) -> ExpertLayout:
    tensors = [file.tensor(f"blk.{layer}.ffn_{p}_exps.weight") for p in _EXPERT_PARTS]
    return ExpertLayout(*(ProjLayout.of(t.qtype, t.dims[1], t.dims[2]) for t in tensors))


def expert_layers(file: GGUFModelFile) -> dict[int, tuple]:
    """{layer: (ExpertLayout, gate, up, down)} with each part as uint8 [n_expert, bytes]."""
    layers = {}
    for i in range(file.config.n_layers):
        tensors = [file.tensor(f"blk.{i}.ffn_{p}_exps.weight") for p in _EXPERT_PARTS]
        arrays = [t.as_bytes().reshape(t.dims[0], -1) for t in tensors]
        layers[i] = (expert_layout(file, i), *arrays)
    return layers


def resident_device_bytes(file: GGUFModelFile, dtype_bytes: int) -> int:
    """Bytes of the weights decoded onto the device: all but the routed experts and the
    token embedding (looked up on the host, row by row)."""
    total = 0
    for name, t in file.tensors.items():
        if is_routed_expert(name) or name == "token_embd.weight":
            continue
        n = 1
        for d in t.dims:
            n *= d
        total += n * dtype_bytes
    if "output.weight" not in file.tensors:  # tied lm_head is decoded from token_embd
        total += file.config.vocab_size * file.config.d_model * dtype_bytes
    return total


def workspace_bytes(file: GGUFModelFile, config: EngineConfig, max_model_len: int, dtype_bytes: int) -> int:
    """Activations of one step: hidden states and expert FFN of a prefill chunk, attention
    scores of the chunk over the context, and the sampled rows' logits."""
    cfg, t = file.config, config.max_batched_tokens
    hidden = t * (8 * cfg.d_model + 3 * max(cfg.expert_ffn, cfg.shared_ffn)) * dtype_bytes
    scores = cfg.n_heads * t * max_model_len * 4
    logits = config.max_batch * cfg.vocab_size * 4
    return hidden + scores + logits


def make_plan(file: GGUFModelFile, config: EngineConfig, kv_bytes: int,
              budget: str | int | None) -> PlacementPlan:
    """What lives on the device: resident weights, KV, workspace, then expert slots."""
    dtype_bytes = 4 if torch.device(config.device).type == "cpu" else 2
    max_model_len = min(config.ctx_size, file.config.context_length)
    slot_bytes = max(expert_layout(file, i).expert_bytes for i in range(file.config.n_layers))
    resident = resident_device_bytes(file, dtype_bytes)
    workspace = workspace_bytes(file, config, max_model_len, dtype_bytes)
    if budget is None:  # only a slot cap was given: the budget is exactly what it needs
        budget_bytes = resident + kv_bytes + workspace + config.max_cached_experts * slot_bytes
    else:
        budget_bytes = parse_bytes(budget)
    return plan_placement(
        budget_bytes=budget_bytes,
        resident_bytes=resident,
        kv_bytes=kv_bytes,
        workspace_bytes=workspace,
        slot_bytes=slot_bytes,
        n_experts_total=file.config.n_layers * file.config.n_experts,
        max_cached_experts=config.max_cached_experts,
    )


def build_expert_source(file: GGUFModelFile, config: EngineConfig,
                        kv_bytes: int) -> tuple[ExpertSource, PlacementPlan | None]:
    device = torch.device(config.device)
    policy = MissPolicy.parse(config.miss_policy)  # a bad name fails even where no cache is built
    store = HostExpertStore(expert_layers(file), pinned=device.type == "cuda" and config.pin_memory)
    budget = config.vram_budget
    if budget is None and device.type == "cuda":
        budget = default_budget(device)
    if budget is None and config.max_cached_experts is None:
        return store, None  # CPU, everything resident in host memory: no copies at all
    plan = make_plan(file, config, kv_bytes, budget)
    log.info("placement plan:\n%s", plan)
    link = _simulated_link(config, device)
    rates = None
    if policy is MissPolicy.AUTO:
        dtype = torch.float32 if device.type == "cpu" else torch.float16
        rates = measure_rates(store, device, lambda x, w: expert_ffn(x, w, config.kernel_backend), dtype,
                              exact=config.kernel_backend != "q8",
                              link_bytes_per_s=link.bytes_per_s if link else None)
    return ExpertCache(store, plan.n_slots, device, policy, rates, copier=link), plan


def _simulated_link(config: EngineConfig, device: torch.device) -> LinkCopier | None:
    if config.simulate_link_gbps is None:
        return None
    if device.type != "cpu":
        raise MoestreamError("a simulated host->device link is for machines without a GPU: "
                             "drop simulate_link_gbps on a CUDA device")
    return LinkCopier(config.simulate_link_gbps * 1e9)
