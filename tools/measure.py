"""What one benchmark run is given and what it measures, shared by moestream's runner
(tools/bench.py) and llama.cpp's (tools/llama_cpp_ref.py)."""

from __future__ import annotations

from dataclasses import dataclass

WARMUP_PROMPT_TOKENS = 16
WARMUP_GEN_TOKENS = 2


@dataclass(frozen=True)
class BenchConfig:
    model: str
    device: str
    vram_budget: str | None
    max_cached_experts: int | None
    threads: int
    prompt_tokens: int
    gen_tokens: int
    n_cpu_moe: int | None  # llama.cpp on a GPU: layers whose experts stay on the CPU (None: all)
    kernels: str = "auto"  # our matmul kernels (engine kernel_backend)
    miss_policy: str = "auto"  # our expert cache misses: auto | copy | cpu
    simulate_link_gbps: float | None = None  # CPU only: our cache's "device" behind a simulated link
    replay_routing: str | None = None  # ours: route from a real log (engine/replay.py)
    profile: bool = False  # ours: time each part of the decode steps (tools/decode_profile.py)
    llama_cpp_repack: bool = True  # llama.cpp on the CPU: its repacked copy of the weights (extra buffer types)


@dataclass(frozen=True)
class RunMetrics:
    prefill_tok_s: float
    decode_tok_s: float
    ttft_s: float
    peak_vram_bytes: int | None  # None: not measurable (llama.cpp on a GPU without nvidia-ml-py)
    host_rss_bytes: int
    expert_hit_rate: float | None = None  # ours only
    h2d_gb_s: float | None = None  # ours only: host->device expert bytes / copy time
    cpu_miss_share: float | None = None  # ours only: share of misses computed on the CPU
    peak_reserved_vram_bytes: int | None = None  # ours only: the caching allocator's peak, what a budget must hold
    decode_profile_ms: dict[str, float] | None = None  # ours with --profile: ms per decode token by part


def timing_metrics(n_prompt: int, start_s: float, token_times_s: list[float]) -> dict[str, float]:
    """TTFT, prefill and decode rates from the wall-clock time of each generated token."""
    ttft = token_times_s[0] - start_s
    decode_s = token_times_s[-1] - token_times_s[0]
    decode = (len(token_times_s) - 1) / decode_s if decode_s > 0 else 0.0
    return {"ttft_s": ttft, "prefill_tok_s": n_prompt / ttft, "decode_tok_s": decode}


def host_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss
