"""`moestream inspect`: what a GGUF model is and where its bytes would go."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from moestream.engine.engine_config import EngineConfig, default_kernels
from moestream.engine.header import ModelHeader
from moestream.engine.loader import GGUFModelFile, open_gguf
from moestream.engine.memory_plan import MemoryPlan, plan_memory
from moestream.kernels.errors import MoestreamError
from moestream.offload.planner import format_bytes, parse_bytes

_GROUPS = (
    ("routed experts", lambda n: n.endswith("_exps.weight")),
    ("shared expert", lambda n: "_shexp" in n),
    ("router", lambda n: "ffn_gate_inp" in n),
    ("attention", lambda n: ".attn_" in n and "norm" not in n),
    ("norms", lambda n: "norm" in n),
    ("token embedding", lambda n: n == "token_embd.weight"),
    ("output head", lambda n: n == "output.weight"),
)


def _group(name: str) -> str:
    return next((g for g, match in _GROUPS if match(name)), "other")


def tensor_groups(file: GGUFModelFile) -> dict[str, tuple[set[str], int]]:
    groups: dict[str, tuple[set[str], int]] = defaultdict(lambda: (set(), 0))
    for name, t in file.tensors.items():
        group = _group(name)
        types, nbytes = groups[group]
        types.add(t.qtype.name)
        groups[group] = (types, nbytes + t.data.nbytes)
    return groups


def describe(path: Path, plan_device: str = "cuda", vram_budget: str | None = None, **settings) -> str:
    """The file's facts and, given a budget, its memory plan (the header is read once)."""
    file = open_gguf(path)
    plan = None
    if vram_budget is not None:
        plan = plan_for(ModelHeader.from_reader(file.reader, str(path)), plan_device, vram_budget, **settings)
    cfg = file.config
    groups = tensor_groups(file)
    expert_bytes = groups.get("routed experts", (set(), 0))[1]
    total = sum(nbytes for _, nbytes in groups.values())
    lines = [
        f"file            {path}",
        f"name            {cfg.name}",
        f"architecture    {cfg.arch}",
        f"layers          {cfg.n_layers}",
        f"d_model         {cfg.d_model}",
        f"heads           {cfg.n_heads} (kv {cfg.n_kv_heads}, head_dim {cfg.head_dim})",
        f"experts         {cfg.n_experts} routed, {cfg.n_experts_used} used per token"
        + (f", shared FFN {cfg.shared_ffn}" if cfg.shared_ffn else ""),
        f"expert FFN      {cfg.expert_ffn}",
        f"vocab           {cfg.vocab_size}",
        f"context length  {cfg.context_length}",
        f"chat template   {'yes' if 'tokenizer.chat_template' in file.meta else 'no'}",
        f"tokenizer       {file.meta.get('tokenizer.ggml.model', '?')} "
        f"(pre: {file.meta.get('tokenizer.ggml.pre', 'default')})",
        "",
        f"{'tensor group':<18}{'types':<24}{'bytes':>14}",
    ]
    for name, (types, nbytes) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"{name:<18}{', '.join(sorted(types)):<24}{format_bytes(nbytes):>14}")
    lines.append(f"{'total':<42}{format_bytes(total):>14}")
    lines.append(f"experts are {expert_bytes / max(total, 1):.1%} of the file; the rest is "
                 f"{format_bytes(total - expert_bytes)}")
    if plan is not None:
        lines += ["", str(plan)]
    return "\n".join(lines)


def plan_for(header: ModelHeader, plan_device: str, vram_budget: str | None, **settings) -> MemoryPlan:
    """The memory plan the engine would make on `plan_device` with these settings, from the
    file's header alone (no tensor data is read): the Engine calls the same plan_memory."""
    config = EngineConfig(device=plan_device, vram_budget=vram_budget,
                          kernel_backend=default_kernels(plan_device, None), **settings)
    return plan_memory(header, config, None if vram_budget is None else parse_bytes(vram_budget))


def plan_json(path: Path, plan_device: str, vram_budget: str | None, **settings) -> str:
    if vram_budget is None and plan_device == "cuda":
        raise MoestreamError("give --vram-budget to plan for cuda (serve's default budget is the free "
                             "GPU memory at start minus a margin), or --plan-for cpu")
    plan = plan_for(ModelHeader.read(path), plan_device, vram_budget, **settings)
    return json.dumps({"file": str(path), **plan.as_dict()}, indent=2)
