"""`moestream inspect`: what a GGUF model is and where its bytes would go."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from moestream.engine.loader import GGUFModelFile, open_gguf
from moestream.offload.planner import format_bytes

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


def describe(path: Path, vram_budget: str | None = None, ctx_size: int = 4096) -> str:
    file = open_gguf(path)
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
    if vram_budget is not None:
        lines += ["", "on a CUDA device (fp16 weights and KV cache; on the CPU, serve and generate keep every "
                  "expert in host memory unless --max-cached-experts is given):",
                  str(plan_for(file, vram_budget, ctx_size))]
    return "\n".join(lines)


def plan_for(file: GGUFModelFile, vram_budget: str, ctx_size: int):
    """The placement plan the engine would make on a GPU with this budget."""
    from moestream.engine.engine_config import EngineConfig
    from moestream.engine.placement import make_plan
    from moestream.offload.planner import kv_cache_bytes

    cfg = file.config
    config = EngineConfig(device="cuda", ctx_size=ctx_size, vram_budget=vram_budget)
    n_tokens = config.kv_tokens(cfg.context_length)
    kv_bytes = kv_cache_bytes(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, n_tokens, 2)
    return make_plan(file, config, kv_bytes, vram_budget)
