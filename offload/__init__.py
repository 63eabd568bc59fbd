"""Where experts live: host store, device expert cache, placement planner, routing traces."""

from offload.cache import ExpertCache
from offload.layout import ExpertLayout, ExpertWeights, ProjLayout
from offload.planner import (
    BudgetTooSmall,
    PlacementPlan,
    default_budget,
    format_bytes,
    kv_cache_bytes,
    parse_bytes,
    plan_placement,
)
from offload.source import ExpertSource
from offload.stats import CacheCounters
from offload.store import HostExpertStore
from offload.trace import RoutingRecorder, RoutingTrace, read_trace

__all__ = [
    "BudgetTooSmall",
    "CacheCounters",
    "ExpertCache",
    "ExpertLayout",
    "ExpertSource",
    "ExpertWeights",
    "HostExpertStore",
    "PlacementPlan",
    "ProjLayout",
    "RoutingRecorder",
    "RoutingTrace",
    "default_budget",
    "format_bytes",
    "kv_cache_bytes",
    "parse_bytes",
    "plan_placement",
    "read_trace",
]
