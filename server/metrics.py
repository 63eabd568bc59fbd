"""Prometheus metrics under vLLM's names (prefix `moestream:`), plus the expert cache's.

Request metrics are recorded as tokens reach each request. Engine counters (expert cache,
copies, prefetch) and the scheduler gauges are read at scrape time from the stats
snapshot the engine thread takes after every step, by a custom collector, so they can
never drift from the engine's own counts. Every series carries the label model_name.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from moestream.engine.memory_plan import MemoryPlan

PREFIX = "moestream:"
# vLLM's buckets, so its Grafana panels read ours unchanged.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# Engine counters exported as <name>_total: (stats key, help); per layer where noted.
LAYER_COUNTERS = {
    "expert_cache_hits": ("expert_hits", "Expert lookups served from the device expert cache."),
    "expert_cache_misses": ("expert_misses", "Expert lookups not served from the device expert cache."),
    "expert_cache_evictions": ("expert_evictions", "Experts evicted from the device expert cache."),
}
TOTAL_COUNTERS = {
    "expert_misses_copied": ("misses_copied", "Expert cache misses copied into a slot and computed "
                             "on the device."),
    "expert_misses_on_cpu": ("misses_on_cpu", "Expert cache misses computed on the CPU from host "
                             "memory, without a copy (hybrid miss policy)."),
    "expert_cpu_compute_seconds": ("cpu_compute_s", "Seconds the CPU side spent computing missed "
                                   "experts (concurrent with the device)."),
    "expert_bytes_to_device": ("bytes_to_device", "Bytes of experts copied host->device."),
    "expert_copy_seconds": ("copy_s", "Seconds the host->device link spent on expert copies."),
    "expert_copy_stall_seconds": ("stall_s", "Seconds compute waited for expert copies."),
    "expert_prefetch_issued": ("prefetch_issued", "Expert copies started by the prefetcher."),
    "expert_prefetch_used": ("prefetch_used", "Prefetched experts that a later lookup used."),
    # vLLM's prefix cache counters (tokens): hits / queries is the hit rate
    "prefix_cache_queries": ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    "prefix_cache_hits": ("prefix_cache_hits", "Prompt tokens served from the prefix cache."),
    "prompt_tokens_computed": ("prompt_tokens_computed", "Prompt tokens run through the model "
                               "(prefilled, not served from the prefix cache; again after a preemption)."),
}


def buckets_1_2_5(maximum: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to `maximum` (vLLM's token-count buckets)."""
    buckets, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > maximum:
                return buckets
            buckets.append(m * scale)
        scale *= 10


@dataclass
class RequestRecord:
    """One request's timings (time.monotonic seconds) and token counts."""

    arrival_s: float
    num_prompt_tokens: int
    scheduled_s: float | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None
    num_generated: int = 0


@dataclass(frozen=True)
class EngineView:
    """What the collector reads: the latest engine stats and fixed facts of the model."""

    stats: Callable[[], dict]
    plan: MemoryPlan | None
    info: dict[str, str]


class ServerMetrics:
    def __init__(self, model_name: str, max_model_len: int):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.engine: EngineView | None = None
        self._define_request_metrics(max_model_len)
        self.registry.register(_EngineCollector(self))

    def _define_request_metrics(self, max_model_len: int) -> None:
        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, ("model_name", *labels), registry=self.registry)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(PREFIX + name, doc, ("model_name",), buckets=buckets, registry=self.registry)

        token_buckets = buckets_1_2_5(max_model_len)
        self.prompt_tokens = counter("prompt_tokens", "Prefilled prompt tokens.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.request_success = counter("request_success", "Finished requests by finish reason.",
                                       ("finished_reason",))
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive tokens.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", REQUEST_LATENCY_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduled.",
                                    REQUEST_LATENCY_BUCKETS)
        self.prefill_time = histogram("request_prefill_time_seconds", "First scheduled to first token.",
                                      REQUEST_LATENCY_BUCKETS)
        self.decode_time = histogram("request_decode_time_seconds", "First token to last token.",
                                     REQUEST_LATENCY_BUCKETS)
        self.prompt_hist = histogram("request_prompt_tokens", "Prompt tokens per request.", token_buckets)
        self.generation_hist = histogram("request_generation_tokens", "Generated tokens per request.",
                                         token_buckets)

    def bind_engine(self, view: EngineView) -> None:
        self.engine = view

    def observe_token(self, rec: RequestRecord, time_s: float, scheduled_s: float | None) -> None:
        name = self.model_name
        if rec.first_token_s is None:
            rec.first_token_s, rec.scheduled_s = time_s, scheduled_s
            self.prompt_tokens.labels(name).inc(rec.num_prompt_tokens)
            self.ttft.labels(name).observe(time_s - rec.arrival_s)
            if scheduled_s is not None:
                self.queue_time.labels(name).observe(max(0.0, scheduled_s - rec.arrival_s))
                self.prefill_time.labels(name).observe(time_s - scheduled_s)
        else:
            self.itl.labels(name).observe(time_s - rec.last_token_s)
        rec.last_token_s = time_s
        rec.num_generated += 1
        self.generation_tokens.labels(name).inc()

    def observe_finish(self, rec: RequestRecord, reason: str) -> None:
        name = self.model_name
        self.request_success.labels(name, reason).inc()
        self.e2e.labels(name).observe(time.monotonic() - rec.arrival_s)
        self.prompt_hist.labels(name).observe(rec.num_prompt_tokens)
        self.generation_hist.labels(name).observe(rec.num_generated)
        if rec.first_token_s is not None:
            self.decode_time.labels(name).observe(rec.last_token_s - rec.first_token_s)


class _EngineCollector(Collector):
    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        view, name = self.metrics.engine, self.metrics.model_name
        stats = view.stats() if view is not None else {}
        yield _gauge("num_requests_running", "Requests in the running batch.", name,
                     stats.get("num_running", 0))
        yield _gauge("num_requests_waiting", "Requests waiting to be scheduled.", name,
                     stats.get("num_waiting", 0))
        yield _gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1).", name,
                     stats.get("kv_cache_usage", 0.0))
        if view is None:
            return
        yield from _engine_counters(stats, name)
        yield from _model_gauges(view, stats, name)


def _gauge(suffix: str, doc: str, model_name: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(PREFIX + suffix, doc, labels=["model_name"])
    family.add_metric([model_name], value)
    return family


def _engine_counters(stats: dict, model_name: str) -> Iterator[Metric]:
    per_layer = stats.get("per_layer", {})
    for suffix, (key, doc) in LAYER_COUNTERS.items():
        family = CounterMetricFamily(PREFIX + suffix, doc, labels=["model_name", "layer"])
        for layer, counters in per_layer.items():
            family.add_metric([model_name, str(layer)], counters.get(key, 0))
        yield family
    for suffix, (key, doc) in TOTAL_COUNTERS.items():
        family = CounterMetricFamily(PREFIX + suffix, doc, labels=["model_name"])
        family.add_metric([model_name], stats.get(key, 0))
        yield family


def _model_gauges(view: EngineView, stats: dict, model_name: str) -> Iterator[Metric]:
    info = GaugeMetricFamily(PREFIX + "model_info", "The served model (value 1).",
                             labels=["model_name", *view.info])
    info.add_metric([model_name, *view.info.values()], 1)
    yield info
    if view.plan is None:  # nothing placed on a device: no budget to report
        return
    plan = view.plan
    yield _gauge("vram_budget_bytes", "Device memory budget of the placement plan.", model_name,
                 plan.budget_bytes)
    yield _gauge("vram_used_bytes", "Device memory measured in use (CUDA: the allocator's "
                 "reservation), not the plan's figure.", model_name, stats.get("vram_used_bytes", 0))
    yield _gauge("expert_cache_slots", "Expert slots in the device expert cache.", model_name,
                 stats.get("n_slots", plan.n_slots))
