"""The one-call CPU decode (kernels/cpu/decode_model.py, csrc/decode_model.h): every layer of
a decode token in one compiled call. Checked against the layer-by-layer Python path of the
same engine (the same kernels called one at a time: only the router's and attention's fp32
summation order differ) and, independently, against transformers' greedy tokens."""

import pytest
import torch

from moestream.engine import SamplingParams
from moestream.engine.engine import Engine
from moestream.kernels.cpu.build import load_extension
from tests.engine.steps import step_logits
from tests.engine.test_generate import hf_greedy
from tests.fixtures.models import get_fixture, sample_token_ids

pytestmark = pytest.mark.skipif(load_extension() is None, reason="no C++ compiler: the CPU kernels did not build")


def _engine(arch: str, quant: str, backend: str) -> Engine:
    return Engine.from_gguf(get_fixture(arch, quant).gguf_path, device="cpu", kernel_backend=backend)


def _decode_logits(engine: Engine, prompt: list[int], n: int, compiled: bool) -> list[torch.Tensor]:
    """Logits of n decode steps after the prompt's prefill, feeding a fixed token stream."""
    model = engine.model
    model._decoder = False if compiled else None  # None: the layer-by-layer path
    table: list[int] = []
    ids = list(prompt)
    step_logits(engine, ids, 0, table)
    out = []
    for j in range(n):
        ids.append(prompt[j % len(prompt)])
        out.append(step_logits(engine, ids, len(ids) - 1, table))
    engine.kv.free(table)
    assert (model._decoder is not None) == compiled
    return out


# OLMoE: q/k norm over all heads; Qwen3: per head, NEOX rope; Mixtral: GQA, no q/k norm
@pytest.mark.parametrize("arch", ["olmoe", "qwen3moe", "mixtral"])
@pytest.mark.parametrize("backend,tol", [("auto", 2e-5), ("q8", 2e-3)])
def test_same_logits_as_the_layer_by_layer_path(arch, backend, tol):
    engine = _engine(arch, "Q4_K_M", backend)
    prompt = sample_token_ids(get_fixture(arch), 11, seed=3)
    compiled = _decode_logits(engine, prompt, 6, compiled=True)
    per_layer = _decode_logits(engine, prompt, 6, compiled=False)
    for a, b in zip(compiled, per_layer):
        assert (a - b).abs().max() <= tol * b.abs().max()


@pytest.mark.parametrize("arch", ["olmoe", "qwen3moe", "mixtral"])
def test_greedy_tokens_match_transformers(arch):
    """Q8_0 weights, exact route: the compiled decode's tokens are transformers' own."""
    fixture = get_fixture(arch)
    engine = _engine(arch, "Q8_0", "auto")
    prompt = sample_token_ids(fixture, 9, seed=21)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    ours = [o.token_id for o in engine.generate(prompt, params)]
    assert engine.model._decoder is not None  # the decode steps ran compiled
    assert ours == hf_greedy(fixture, prompt, 6)


def test_counts_expert_lookups_as_the_layer_path_does():
    engine = _engine("olmoe", "Q4_K_M", "q8")
    prompt = sample_token_ids(get_fixture("olmoe"), 5, seed=1)
    counts = []
    for compiled in (True, False):
        before = engine.experts.stats()["expert_lookups"]
        _decode_logits(engine, prompt, 3, compiled)
        counts.append(engine.experts.stats()["expert_lookups"] - before)
    assert counts[0] == counts[1] > 0


def test_models_it_does_not_cover_run_layer_by_layer():
    engine = _engine("qwen2moe", "Q4_K_M", "q8")  # a shared expert
    assert engine.model._compiled_decoder() is None
    f32 = _engine("olmoe", "F32", "auto")  # weights decoded to floats
    assert f32.model._compiled_decoder() is None


def test_a_routing_hook_takes_the_layer_path():
    engine = _engine("olmoe", "Q4_K_M", "q8")
    seen = []
    engine.model.routing_hook = lambda layer, ids, weights: seen.append(layer)
    prompt = sample_token_ids(get_fixture("olmoe"), 5, seed=2)
    table: list[int] = []
    step_logits(engine, prompt, 0, table)
    seen.clear()
    step_logits(engine, prompt + [prompt[0]], len(prompt), table)
    assert seen == list(range(engine.model.config.n_layers))  # every layer's routing shown


@pytest.mark.parametrize("backend,tol", [("auto", 2e-5), ("q8", 2e-3)])
def test_a_scattered_block_table_reads_through_slot_ids(backend, tol):
    """A sequence whose KV blocks are not consecutive (another sequence took the block after
    its first): the one-call decode reads the context through the slot ids, and its logits
    are the layer path's (which gathers the slots)."""
    engine = _engine("olmoe", "Q4_K_M", backend)
    kv, bs = engine.kv, engine.kv.block_size
    prompt = sample_token_ids(get_fixture("olmoe"), bs - 2, seed=7)
    logits = {}
    for compiled in (True, False):
        engine.model._decoder = False if compiled else None
        table, other = [], []
        ids = list(prompt)
        step_logits(engine, ids, 0, table)
        kv.allocate(other, bs)  # the next block goes to another sequence
        out = []
        for j in range(5):  # grows into a third block: the table is no longer one run
            ids.append(prompt[j])
            out.append(step_logits(engine, ids, len(ids) - 1, table))
        assert not isinstance(kv.index(table, 0, len(ids)), slice), "the test needs a scattered table"
        assert (engine.model._decoder is not None) == compiled
        kv.free(table)
        kv.free(other)
        logits[compiled] = out
    for a, b in zip(logits[True], logits[False]):
        assert (a - b).abs().max() <= tol * b.abs().max()
