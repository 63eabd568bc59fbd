"""moestream:vram_used_bytes reports the engine's measurement, not the plan's figure."""

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from moestream.engine.engine_config import EngineConfig
from moestream.engine.header import ModelHeader
from moestream.engine.memory_plan import plan_memory
from moestream.server.metrics import EngineView, ServerMetrics
from tests.fixtures.models import get_fixture


def test_vram_used_is_the_measurement_and_slots_follow_a_shrunk_cache():
    header = ModelHeader.read(get_fixture("olmoe", "Q4_K_M").gguf_path)
    plan = plan_memory(header, EngineConfig(device="cuda", ctx_size=256), 1 << 30)
    measured = plan.used_bytes + 12345  # e.g. the allocator's reservation above the plan
    metrics = ServerMetrics("m", 256)
    metrics.bind_engine(EngineView(lambda: {"vram_used_bytes": measured, "n_slots": plan.n_slots - 3},
                                   plan, {}))
    samples = {s.name: s.value for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
               for s in family.samples}
    assert samples["moestream:vram_used_bytes"] == measured
    assert samples["moestream:vram_budget_bytes"] == 1 << 30
    assert samples["moestream:expert_cache_slots"] == plan.n_slots - 3
