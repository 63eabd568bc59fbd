"""Where experts live: host store, device expert cache, placement planner, routing traces."""

from moestream.offload.cache import ExpertCache
from moestream.offload.layout import ExpertLayout, ExpertWeights, ProjLayout
from moestream.offload.planner import (
    BudgetTooSmall,
    default_budget,
    fit_slots,
    format_bytes,
    parse_bytes,
)
from moestream.offload.source import ExpertSource
from moestream.offload.stats import CacheCounters
from moestream.offload.store import HostExpertStore
from moestream.offload.trace import RoutingRecorder, RoutingTrace, read_trace

__all__ = [
    "BudgetTooSmall",
    "CacheCounters",
    "ExpertCache",
    "ExpertLayout",
    "ExpertSource",
    "ExpertWeights",
    "HostExpertStore",
    "ProjLayout",
    "RoutingRecorder",
    "RoutingTrace",
    "default_budget",
    "fit_slots",
    "format_bytes",
    "parse_bytes",
    "read_trace",
]
