"""Routing replayed from a log: the engine routes exactly the log's rows, layer by layer."""

import json

import pytest
import torch

from moestream.engine import Engine, SamplingParams
from moestream.engine.replay import RoutingReplay
from moestream.kernels.errors import MoestreamError
from moestream.offload.trace import read_trace
from tests.fixtures.models import get_fixture, sample_token_ids


def write_log(path, rows, n_experts, top_k):
    """A moestream-format log (offload/trace.py), one layer, written here by hand."""
    lines = [{"type": "meta", "n_experts": n_experts, "n_layers": 1, "top_k": top_k}]
    lines += [{"seq": 0, "pos": i, "layer": 0, "experts": r, "weights": [1 / top_k] * top_k}
              for i, r in enumerate(rows)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_engine_routes_the_log_rows_in_order(tmp_path):
    fixture = get_fixture("olmoe", "Q4_K_M")  # 2 layers, top-2 of 8 experts
    rows = [[i % 8, (3 * i + 1) % 8] for i in range(10)]
    rows = [r if r[0] != r[1] else [r[0], (r[1] + 1) % 8] for r in rows]
    write_log(tmp_path / "log.jsonl", rows, 8, 2)
    engine = Engine.from_gguf(fixture.gguf_path, max_cached_experts=3, replay_routing=str(tmp_path / "log.jsonl"))
    seen = {0: [], 1: []}
    engine.model.routing_hook = lambda layer, ids, w: seen[layer].extend(ids.tolist())
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    list(engine.generate(sample_token_ids(fixture, 6, seed=40), params))
    # 6 prompt tokens + 3 decode steps = 9 rows per layer; layer 1 starts 10 // 2 rows later
    assert seen[0] == rows[:9]
    assert seen[1] == (rows[5:] + rows)[:9]
    assert engine.stats()["prefetch_issued"] == 0  # prefetch predicts from hidden states: off


def test_real_olmoe_log_rows_after_the_warm_up(shared_data):
    path = shared_data / "routing" / "olmoe-1b-7b-0924_layer0.jsonl"
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    routes = [x["topk_ids"] for x in raw if x.get("type") == "route"]
    first_real = next(i for i, r in enumerate(routes) if r != routes[0])
    replay = RoutingReplay(read_trace(path), n_experts=64, top_k=8, n_layers=16)
    ids, weights = replay.route(0, 3, torch.device("cpu"))
    assert ids.tolist() == routes[first_real:first_real + 3]
    assert torch.allclose(weights, torch.full((3, 8), 1 / 8))


def test_log_of_another_shape_is_refused(shared_data):
    trace = read_trace(shared_data / "routing" / "qwen1.5-moe-a2.7b-chat_layer0.jsonl")
    with pytest.raises(MoestreamError, match="top-4 of 60 experts but the model routes top-8 of 64"):
        RoutingReplay(trace, n_experts=64, top_k=8, n_layers=16)
