"""llama.cpp (through llama-cpp-python) as the reference engine of `bench` and `perplexity`.

Imported only when a comparison is asked for; llama-cpp-python is an optional dependency.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from moestream.tools.measure import WARMUP_PROMPT_TOKENS, BenchConfig, RunMetrics, host_rss_bytes, timing_metrics
from moestream.kernels.errors import MoestreamError

_EXPERT_PATTERN = r"ffn_(up|down|gate)_exps"  # llama.cpp common's --cpu-moe pattern
_GGML_BACKEND_DEVICE_TYPE_CPU = 0


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        raise MoestreamError("comparing with llama.cpp needs llama-cpp-python: "
                             "pip install llama-cpp-python") from exc
    return llama_cpp


class _BuftOverride(ctypes.Structure):
    """llama.h `struct llama_model_tensor_buft_override`."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def expert_patterns(n_cpu_moe: int | None) -> list[str]:
    """llama.cpp's --cpu-moe (None: every layer) or --n-cpu-moe N (the first N layers)."""
    if n_cpu_moe is None:
        return [rf"\.{_EXPERT_PATTERN}"]
    return [rf"blk\.{i}\.{_EXPERT_PATTERN}" for i in range(n_cpu_moe)]


@contextmanager
def experts_on_cpu(n_cpu_moe: int | None) -> Iterator[None]:
    """While open, llama_cpp.Llama(...) keeps routed experts in host memory as
    --cpu-moe/--n-cpu-moe do. llama-cpp-python 0.3.36 declares the model-params field
    tensor_buft_overrides but has no argument for it, so the default params are wrapped."""
    patterns = expert_patterns(n_cpu_moe)
    if not patterns:
        yield
        return
    llama_cpp = _llama_cpp()
    from llama_cpp import _ggml

    lib = _ggml.libggml
    lib.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    lib.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    lib.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
    lib.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
    cpu_buft = lib.ggml_backend_dev_buffer_type(lib.ggml_backend_dev_by_type(_GGML_BACKEND_DEVICE_TYPE_CPU))
    overrides = (_BuftOverride * (len(patterns) + 1))(
        *[_BuftOverride(p.encode(), cpu_buft) for p in patterns], _BuftOverride(None, None))
    module = llama_cpp.llama_cpp
    original = module.llama_model_default_params

    def default_params():
        params = original()
        params.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
        return params

    module.llama_model_default_params = default_params
    try:
        yield
    finally:
        module.llama_model_default_params = original


@contextmanager
def without_repack(is_off: bool) -> Iterator[None]:
    """While open (and `is_off`), llama_cpp.Llama(...) leaves its extra buffer types unused:
    no repacked copy of the weights beside the memory map (use_extra_bufts = false, what
    llama.cpp's --no-repack sets), for files whose copy would not fit in host memory."""
    if not is_off:
        yield
        return
    module = _llama_cpp().llama_cpp
    original = module.llama_model_default_params

    def default_params():
        params = original()
        params.use_extra_bufts = False
        return params

    module.llama_model_default_params = default_params
    try:
        yield
    finally:
        module.llama_model_default_params = original


def process_gpu_bytes() -> int | None:
    """GPU memory this process holds, from NVML (llama.cpp allocates outside torch); None
    when nvidia-ml-py is not installed."""
    try:
        import pynvml
    except ImportError:
        return None
    pynvml.nvmlInit()
    try:
        total = 0
        for i in range(pynvml.nvmlDeviceGetCount()):
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(i)):
                if proc.pid == os.getpid():
                    total += proc.usedGpuMemory or 0
        return total
    finally:
        pynvml.nvmlShutdown()


class LlamaCppRunner:
    """The bench runner: greedy decoding through llama_cpp.Llama.eval, argmax of the last logits."""

    def __init__(self, config: BenchConfig):
        self.llama_cpp, self.on_gpu = _llama_cpp(), config.device == "cuda"
        n_batch = max(config.prompt_tokens, WARMUP_PROMPT_TOKENS)
        with experts_on_cpu(config.n_cpu_moe if self.on_gpu else 0), without_repack(not config.llama_cpp_repack):
            self.llm = self.llama_cpp.Llama(
                model_path=config.model, n_ctx=config.prompt_tokens + config.gen_tokens + 16,
                n_batch=n_batch, n_ubatch=n_batch, n_threads=config.threads,
                n_threads_batch=config.threads, n_gpu_layers=-1 if self.on_gpu else 0, verbose=False)

    def _greedy(self) -> int:
        logits = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.ctypeslib.as_array(logits, shape=(self.llm.n_vocab(),)).argmax())

    def run(self, prompt_ids: list[int], gen_tokens: int) -> RunMetrics:
        self.llm.reset()
        start, times = time.perf_counter(), []
        self.llm.eval(prompt_ids)
        token = self._greedy()
        times.append(time.perf_counter())
        for _ in range(gen_tokens - 1):
            self.llm.eval([token])
            token = self._greedy()
            times.append(time.perf_counter())
        return RunMetrics(**timing_metrics(len(prompt_ids), start, times),
                          peak_vram_bytes=process_gpu_bytes() if self.on_gpu else 0,
                          host_rss_bytes=host_rss_bytes())


@contextmanager
def llama_cpp_scorer(model_path: str | Path, n_ctx: int, n_threads: int | None = None,
                     n_gpu_layers: int = 0) -> Iterator:
    """A perplexity scorer: token ids -> F32 logits [T, V] of every position, closed on exit."""
    llm = _llama_cpp().Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                             logits_all=True, n_threads=n_threads, n_threads_batch=n_threads,
                             n_gpu_layers=n_gpu_layers, verbose=False)

    def score(token_ids: list[int]) -> torch.Tensor:
        llm.reset()
        llm.eval(token_ids)
        return torch.from_numpy(np.array(llm.scores[: len(token_ids)], dtype=np.float32))

    try:
        yield score
    finally:
        llm.close()
