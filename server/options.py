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


def engine_options(args: argparse.Namespace) -> dict:
    import torch

    from moestream.engine.engine_config import default_kernels

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return dict(device=device, vram_budget=args.vram_budget, max_cached_experts=args.max_cached_experts,
                ctx_size=args.ctx_size, pin_memory=not args.no_pin, prefetch=not args.no_prefetch,
                record_routing=args.record_routing, kernel_backend=default_kernels(device, args.kernels),
                miss_policy=args.miss_policy)
