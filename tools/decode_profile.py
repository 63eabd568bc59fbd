"""Where a decode token's time goes: the per-part table of `moestream bench --profile`.

Timers wrap the functions and methods that compute each part of a step, patched in only
while a `StepProfiler` is installed: without --profile nothing is patched and the hot path
pays nothing. Each timer counts its time exclusive of the timers nested inside it (the
attention projections inside the attention, the expert kernels inside the MoE layer), so
the parts of one `Engine.step` add up to that step's wall time; what the outer methods keep
for themselves is the Python around the kernels. Each wrapped call costs about a
microsecond (a few hundred calls a token on OLMoE), which the figures include.

A probe whose target the engine no longer has is skipped with a warning: its time then
lands in the part that calls it, and the missing row shows it.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from time import perf_counter

from moestream.kernels.cpu.decode_model import CpuDecodeModel

log = logging.getLogger(__name__)

EXPERTS = "expert kernels"
ATTN_PROJ = "attention projections"
LM_HEAD = "lm_head"
SHARED = "shared expert matmuls"
ATTN_MATHS = "attention maths (KV cache, scores, softmax)"
NORM_ROPE = "norms and rope"
ROUTING = "routing (router matmul, softmax, top-k)"
EMBEDDING = "embedding"
MOE_PY = "MoE layer Python (plan, gather, sum)"
FORWARD_PY = "forward Python (residuals, layer loop)"
STEP_PY = "step Python (schedule, batch, sample)"
DELTANET = "DeltaNet recurrence (conv, state update)"
DELTANET_GATES = "DeltaNet gates, norm and Python"
# Table order; the parts a model never reaches (a shared expert, DeltaNet layers) are left out of it.
PARTS = (EXPERTS, ATTN_PROJ, LM_HEAD, SHARED, ATTN_MATHS, DELTANET, DELTANET_GATES, NORM_ROPE, ROUTING, EMBEDDING,
         MOE_PY, FORWARD_PY, STEP_PY)
# The weight-reading matmuls (with their Python calls); the rest is what issue 17 wants under 3 ms.
MATMUL_PARTS = (EXPERTS, ATTN_PROJ, LM_HEAD, SHARED)
# Reached by a decode step of every supported architecture (the one-call CPU decode has no
# MoE layer Python: its layers never return to Python).
REQUIRED_PARTS = tuple(p for p in PARTS if p not in (SHARED, DELTANET, DELTANET_GATES, MOE_PY))
# The one-call CPU decode (kernels/cpu/decode_model.py) times its own parts; they map to these.
COMPILED_PARTS = {"norms": NORM_ROPE, "q/k/v": ATTN_PROJ, "attention": ATTN_MATHS, "output projection": ATTN_PROJ,
                  "router": ROUTING, "experts": EXPERTS, "lm_head": LM_HEAD}
# Hybrid models (qwen35moe): the token mixers' projections count as attention projections.
_MIXER_LINEARS = ("wq", "wk", "wv", "wo", "qkv", "z", "alpha", "beta", "out")
STEP_MEASURED = "decode step, measured between tokens"


@dataclass(frozen=True)
class Probe:
    module: str  # where the target lives: "module" or "module:Class"
    name: str
    part: str  # or, for Linear, resolved per call (see StepProfiler._linear_part)


PROBES = (
    Probe("moestream.engine.engine:Engine", "step", STEP_PY),
    Probe("moestream.engine.model:MoEModel", "forward", FORWARD_PY),
    Probe("moestream.engine.model:MoEModel", "_attention", ATTN_MATHS),
    Probe("moestream.engine.model:MoEModel", "route", ROUTING),
    Probe("moestream.engine.model:MoEModel", "_moe", MOE_PY),
    Probe("moestream.engine.model", "rms_norm", NORM_ROPE),
    Probe("moestream.engine.model", "cpu_add_rms_norm", NORM_ROPE),  # with the residual add
    Probe("moestream.engine.layers:Rope", "__call__", NORM_ROPE),
    Probe("moestream.engine.layers:Rope", "tables", NORM_ROPE),
    Probe("moestream.engine.layers:Embedding", "__call__", EMBEDDING),
    Probe("moestream.engine.layers:Linear", "__call__", ATTN_PROJ),
    Probe("moestream.engine.model", "project_many", ATTN_PROJ),  # q, k, v in one call
    Probe("moestream.engine.model", "cpu_moe_layer", EXPERTS),
    Probe("moestream.engine.model", "expert_ffn", EXPERTS),
    Probe("moestream.engine.model", "moe_ffn", EXPERTS),
    Probe("moestream.engine.models.qwen35moe:Qwen35MoeModel", "forward", FORWARD_PY),
    Probe("moestream.engine.models.qwen35moe:Qwen35MoeModel", "_gated_attention", ATTN_MATHS),
    Probe("moestream.engine.models.qwen35moe:Qwen35MoeModel", "_deltanet", DELTANET_GATES),
    Probe("moestream.engine.models.qwen35moe:Qwen35MoeModel", "_deltanet_step", DELTANET),
    Probe("moestream.engine.models.qwen35moe:Qwen35MoeModel", "_deltanet_prefill", DELTANET),
    Probe("moestream.engine.models.qwen35moe", "rms_norm", NORM_ROPE),
    # what the compiled call does not time itself (its Python and pybind) is forward Python
    Probe("moestream.kernels.cpu.decode_model:CpuDecodeModel", "run", FORWARD_PY),
)


def _resolve(probe: Probe) -> object | None:
    import importlib

    module_name, _, class_name = probe.module.partition(":")
    try:
        owner = importlib.import_module(module_name)
        owner = getattr(owner, class_name) if class_name else owner
    except (ImportError, AttributeError):
        return None
    return owner if hasattr(owner, probe.name) else None


class StepProfiler:
    """Exclusive time per part of every `Engine.step` while installed (a context manager)."""

    def __init__(self, engine):
        model = engine.model
        self._lm_head = id(model.lm_head)
        mixers = [getattr(layer, "mixer", layer) for layer in model.layers]
        self._attention = {id(getattr(m, n)) for m in mixers for n in _MIXER_LINEARS if hasattr(m, n)}
        self._thread = threading.get_ident()  # other threads (the hybrid CPU side) pass through
        self._stack: list[list[float]] = []  # [start, time of nested timers] per open timer
        self._current: dict[str, float] = {}
        self.steps: list[tuple[float, dict[str, float]]] = []  # (step wall s, {part: exclusive s})

    def _linear_part(self, linear: object) -> str:
        if id(linear) == self._lm_head:
            return LM_HEAD
        return ATTN_PROJ if id(linear) in self._attention else SHARED

    def _timed(self, fn: Callable, part: str, is_linear: bool, compiled: bool = False) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if threading.get_ident() != self._thread:
                return fn(*args, **kwargs)
            self._stack.append([perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                if compiled:  # its own timers: their parts count as nested inside this call
                    for name, seconds in args[0].last_seconds.items():
                        self._current[COMPILED_PARTS[name]] = self._current.get(COMPILED_PARTS[name], 0.0) + seconds
                        self._stack[-1][1] += seconds
                start, nested = self._stack.pop()
                elapsed = perf_counter() - start
                label = self._linear_part(args[0]) if is_linear else part
                self._current[label] = self._current.get(label, 0.0) + elapsed - nested
                if self._stack:
                    self._stack[-1][1] += elapsed
                else:  # the outermost timer (Engine.step) closed: one step done
                    self.steps.append((elapsed, self._current))
                    self._current = {}
        return timed

    @contextmanager
    def installed(self) -> Iterator[StepProfiler]:
        patched: list[tuple[object, str, object | None]] = []  # (owner, name, own attribute or None)
        missing = []
        try:
            for probe in PROBES:
                owner = _resolve(probe)
                if owner is None:
                    missing.append(f"{probe.module}.{probe.name}")
                    continue
                original = getattr(owner, probe.name)
                patched.append((owner, probe.name, vars(owner).get(probe.name)))
                setattr(owner, probe.name, self._timed(original, probe.part, probe.name == "__call__"
                                                       and probe.module.endswith(":Linear"),
                                                       probe.module.endswith(":CpuDecodeModel")))
            if missing:
                log.warning("profile: the engine has no %s; their time counts in their callers", ", ".join(missing))
            CpuDecodeModel.timing = True
            yield self
        finally:
            CpuDecodeModel.timing = False
            for owner, name, own in reversed(patched):
                if own is None:  # inherited: drop the wrapper, the base's attribute shows again
                    delattr(owner, name)
                else:
                    setattr(owner, name, own)


def decode_breakdown_ms(steps: list[tuple[float, dict[str, float]]], token_times_s: list[float]) -> dict[str, float]:
    """Mean ms per decode token of each part, and the step time measured between tokens.

    One step makes one token (a single sequence): the decode steps are the last
    len(token_times_s) - 1 steps (the ones before make the prompt's first token)."""
    n = len(token_times_s) - 1
    if n < 1 or len(steps) < n:
        return {}
    decode = steps[-n:]
    totals: dict[str, float] = {}
    for _, parts in decode:
        for part, seconds in parts.items():
            totals[part] = totals.get(part, 0.0) + seconds
    result = {part: 1e3 * totals[part] / n for part in PARTS if part in totals}
    result[STEP_MEASURED] = 1e3 * (token_times_s[-1] - token_times_s[0]) / n
    return result


def format_breakdown(breakdown_ms: dict[str, float]) -> str:
    """The per-part table: ms per decode token and share of the measured step."""
    step = breakdown_ms.get(STEP_MEASURED)
    if not step:
        return "(no decode steps profiled)"
    lines = [f"{'decode token, by part':<46}{'ms':>9}{'share':>8}", "-" * 63]
    parts = [p for p in PARTS if p in breakdown_ms]
    for part in parts:
        lines.append(f"{part:<46}{breakdown_ms[part]:>9.2f}{breakdown_ms[part] / step:>8.1%}")
    total = sum(breakdown_ms[p] for p in parts)
    matmuls = sum(breakdown_ms.get(p, 0.0) for p in MATMUL_PARTS)
    lines += ["-" * 63, f"{'sum of the parts':<46}{total:>9.2f}{total / step:>8.1%}",
              f"{'  of which quantized matmuls':<46}{matmuls:>9.2f}{matmuls / step:>8.1%}",
              f"{'  of which the rest':<46}{total - matmuls:>9.2f}{(total - matmuls) / step:>8.1%}",
              f"{STEP_MEASURED:<46}{step:>9.2f}{1:>8.1%}"]
    return "\n".join(lines)
