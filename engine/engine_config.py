"""The engine's runtime settings, one frozen record built once from the command line."""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil
import torch

from moestream.kernels.errors import MoestreamError


@dataclass(frozen=True)
class EngineConfig:
    device: str = "cpu"
    ctx_size: int = 4096  # longest sequence (prompt + output), capped by the model's
    max_batch: int = 8  # sequences decoded together
    max_batched_tokens: int = 256  # prefill chunk budget per step
    max_waiting: int = 64
    vram_budget: str | int | None = None
    max_cached_experts: int | None = None
    prefetch: bool = True
    pin_memory: bool = True
    kernel_backend: str = "auto"
    miss_policy: str = "auto"  # expert cache misses: auto (cost model) | copy | cpu
    simulate_link_gbps: float | None = None  # CPU only: the cache's "device" behind a link this fast
    kv_block_size: int = 16
    kv_tokens: int | None = None  # KV pool shared by the running sequences; None: one context
    kv_dtype: str = "f16"  # KV element type (KV_DTYPES); attention computes in fp32
    prefix_cache: bool = True  # reuse the KV blocks of earlier prompts' prefixes (not hybrids)
    dense_weights: bool = False  # CUDA: resident Linear weights decoded to fp16 when they fit
    record_routing: str | None = None  # JSONL file of each token's experts per layer
    replay_routing: str | None = None  # benchmarks: route from this real log (engine/replay.py)

    def __post_init__(self) -> None:
        if self.kv_dtype not in KV_DTYPES:
            raise MoestreamError(f"KV dtype {self.kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")
        for name in ("ctx_size", "max_batch", "max_batched_tokens", "kv_block_size"):
            if getattr(self, name) < 1:
                raise MoestreamError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.kv_tokens is not None and self.kv_tokens < 1:
            raise MoestreamError(f"--kv-tokens must be at least 1, got {self.kv_tokens}")


KV_DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}


def kv_dtype_bytes(name: str) -> int:
    return KV_DTYPES[name].itemsize


def default_kernels(device: str, kernels: str | None) -> str:
    """The command line follows llama.cpp's numerics on the CPU (q8) unless told otherwise;
    EngineConfig's default stays the exact path ("auto")."""
    return kernels or ("q8" if torch.device(device).type == "cpu" else "auto")


def default_threads() -> int:
    """CPU threads when none are given: $OMP_NUM_THREADS if set (the user's explicit choice),
    else the physical cores this process may run on (llama.cpp's default; a second
    hyperthread per core only adds contention to bandwidth-bound kernels)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(allowed, psutil.cpu_count(logical=False) or allowed))
