"""Engine options shared by the commands that load a model (serve, generate): their choices,
help texts, and the EngineConfig keyword arguments built from parsed flags."""

from __future__ import annotations

import argparse

from moestream.offload.hybrid import MissPolicy

KERNEL_CHOICES = ("auto", "q8", "torch", "triton")
MISS_POLICIES = tuple(p.value for p in MissPolicy)
MISS_POLICY_HELP = ("what an expert cache miss does: auto (per miss and step, copy it into a slot "
                    "or compute it on the CPU from host memory, whichever a cost model measured at "
                    "start-up says finishes first), copy (always copy: a plain LRU cache), cpu "
                    "(always compute on the CPU; the slots hold the last layers' experts, as "
                    "llama.cpp's --n-cpu-moe); default auto")
KERNELS_HELP = ("matmul kernels: q8 (CPU: activations rounded to int8 blocks as llama.cpp does; "
                "about 1%% from exact, 1.8x faster), auto (exact fp32: compiled CPU kernels, Triton "
                "on CUDA), torch (reference), triton; default: q8 on the CPU, auto on CUDA")

KV_DTYPE_CHOICES = ("f16", "bf16", "f32")
KV_TOKENS_HELP = ("size of the KV cache in tokens, one pool shared by all running sequences (each "
                  "may still grow to --ctx-size; as llama.cpp's unified KV cache or SGLang's "
                  "--max-total-tokens); default: the context size, capped by the model's trained context")
KV_DTYPE_HELP = ("element type of the KV cache (llama.cpp's --cache-type-k/-v): f16, bf16 or f32; "
                 "attention computes in fp32 either way; default f16")
DENSE_WEIGHTS_HELP = ("CUDA: decode the resident weights (attention, shared experts, lm_head) to fp16 "
                      "when the budget has room for them (faster matmuls, fewer expert slots); "
                      "default: kept quantized, read by the quantized matmul kernels")


def add_memory_args(p: argparse.ArgumentParser) -> None:
    """The KV and resident-weight flags of the commands that load or plan a model."""
    p.add_argument("--kv-tokens", type=int, default=None, help=KV_TOKENS_HELP)
    p.add_argument("--kv-dtype", default="f16", choices=KV_DTYPE_CHOICES, help=KV_DTYPE_HELP)
    p.add_argument("--dense-weights", action="store_true", help=DENSE_WEIGHTS_HELP)


def engine_options(args: argparse.Namespace) -> dict:
    import torch

    from moestream.engine.engine_config import default_kernels

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return dict(device=device, vram_budget=args.vram_budget, max_cached_experts=args.max_cached_experts,
                ctx_size=args.ctx_size, pin_memory=not args.no_pin, prefetch=not args.no_prefetch,
                record_routing=args.record_routing, kernel_backend=default_kernels(device, args.kernels),
                miss_policy=args.miss_policy, kv_tokens=args.kv_tokens, kv_dtype=args.kv_dtype,
                dense_weights=args.dense_weights)
