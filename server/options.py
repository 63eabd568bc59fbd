"""Engine options shared by the commands that load a model (serve, generate): their choices,
help texts, the parser types that check them before anything starts, and the EngineConfig
keyword arguments built from parsed flags."""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Callable, Sequence

from moestream.engine.engine_config import default_threads
from moestream.kernels.errors import MoestreamError
from moestream.offload.hybrid import MissPolicy
from moestream.offload.planner import parse_bytes

log = logging.getLogger(__name__)

KERNEL_CHOICES = ("auto", "q8", "torch", "triton")
REASONING_FORMATS = ("auto", "none")  # serve: server/reasoning.py
MISS_POLICIES = tuple(p.value for p in MissPolicy)
MISS_POLICY_HELP = ("what an expert cache miss does: auto (per miss and step, copy it into a slot "
                    "or compute it on the CPU from host memory, whichever a cost model measured at "
                    "start-up says finishes first), copy (always copy: a plain LRU cache), cpu "
                    "(always compute on the CPU; the slots hold the last layers' experts, as "
                    "llama.cpp's --n-cpu-moe)")
KERNELS_HELP = ("matmul kernels: q8 (CPU: activations rounded to int8 blocks as llama.cpp does; "
                "about 1%% from exact, 1.8x faster), auto (exact fp32: compiled CPU kernels, Triton "
                "on CUDA), torch (reference), triton (default: q8 on the CPU, auto on CUDA)")
THREADS_HELP = ("CPU threads for the compiled kernels and torch, as llama.cpp's -t (default: "
                "$OMP_NUM_THREADS if set, else the physical cores: %d here)")
DEVICE_HELP = "cpu, cuda or cuda:N (default: cuda when available)"
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


# -- parser types: a bad value exits 2 at parse time, before a port is bound ---------------
def size_arg(text: str) -> str:
    """A byte size such as 2GiB; kept as written (the planner reads it, and messages quote it)."""
    try:
        parse_bytes(text)
    except MoestreamError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def port_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (0-65535)")
    return value


def device_arg(text: str) -> str:
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: give cpu, cuda or cuda:N")
    return text


def one_of(choices: Sequence[str], what: str) -> Callable[[str], str]:
    """A type checking a choice; unlike `choices=`, argparse also applies it to a default
    taken from the environment."""
    def check(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}: one of {', '.join(choices)}")
        return text
    return check


def add_threads_arg(parser: argparse.ArgumentParser, **kwargs) -> None:
    parser.add_argument("--threads", "-t", type=positive_int, default=None,
                        help=THREADS_HELP % default_threads(), **kwargs)


# -- from flags to the engine --------------------------------------------------------------
def apply_threads(threads: int | None) -> int:
    """Set the CPU thread count of torch and of the compiled kernels (they run in torch's
    intra-op pool, at::parallel_for); threads started later (the server's loader, the hybrid
    policy's CPU worker) take the same count."""
    import torch

    n = threads or default_threads()
    torch.set_num_threads(n)
    log.info("CPU threads: %d", n)
    return n

KV_DTYPE_CHOICES = ("f16", "bf16", "f32")
KV_TOKENS_HELP = ("size of the KV cache in tokens, one pool shared by all running sequences (each "
                  "may still grow to --ctx-size; as llama.cpp's unified KV cache or SGLang's "
                  "--max-total-tokens); default: the context size, capped by the model's trained context")
KV_DTYPE_HELP = ("element type of the KV cache (llama.cpp's --cache-type-k/-v): f16, bf16 or f32; "
                 "attention computes in fp32 either way; default f16")
NO_PREFIX_CACHE_HELP = ("do not reuse the KV blocks of earlier prompts' shared prefixes (multi-turn "
                        "chats, system prompts), as vLLM without --enable-prefix-caching; default: reuse "
                        "them (hybrid models never do: their recurrent state is not kept per block)")
DENSE_WEIGHTS_HELP = ("CUDA: decode the resident weights (attention, shared experts, lm_head) to fp16 "
                      "when the budget has room for them (faster matmuls, fewer expert slots); "
                      "default: kept quantized, read by the quantized matmul kernels")


def add_memory_args(p: argparse.ArgumentParser) -> None:
    """The KV and resident-weight flags of the commands that load or plan a model."""
    p.add_argument("--kv-tokens", type=positive_int, default=None, help=KV_TOKENS_HELP)
    p.add_argument("--kv-dtype", default="f16", type=one_of(KV_DTYPE_CHOICES, "KV dtype"), choices=KV_DTYPE_CHOICES,
                   help=KV_DTYPE_HELP)
    p.add_argument("--dense-weights", action="store_true", help=DENSE_WEIGHTS_HELP)


def engine_options(args: argparse.Namespace) -> dict:
    import torch

    from moestream.engine.engine_config import default_kernels

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MoestreamError(f"--device {device}: torch sees no CUDA device (a CPU-only build of torch, "
                             "or no NVIDIA driver); use --device cpu")
    return dict(device=device, vram_budget=args.vram_budget, max_cached_experts=args.max_cached_experts,
                ctx_size=args.ctx_size, pin_memory=not args.no_pin, prefetch=not args.no_prefetch,
                record_routing=args.record_routing, kernel_backend=default_kernels(device, args.kernels),
                miss_policy=args.miss_policy, kv_tokens=args.kv_tokens, kv_dtype=args.kv_dtype,
                dense_weights=args.dense_weights, prefix_cache=not args.no_prefix_cache)
