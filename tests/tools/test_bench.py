"""`moestream bench` and `moestream perplexity` on tiny models.

Perplexity is checked against an independent computation from transformers' logits of the
same chunks (the fixture's source model) and against llama.cpp on its own tokenization.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moestream.tools.bench import add_bench_args, bench_main
from moestream.tools.perplexity import add_perplexity_args, make_chunks, perplexity_main
from moestream.tools.synth import get_preset, write_synthetic
from tests.fixtures.models import get_fixture, hf_logits

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the reference")

N_CTX = 64
N_CHUNKS = 3


def parse(add_args, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_args(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def text_file(shared_data: Path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ppl") / "text.txt"
    path.write_text((shared_data / "text" / "tinyshakespeare.txt").read_text()[:3000])
    return path


def reference_ppl(logits_of, chunks: list[list[int]]) -> float:
    """llama.cpp's definition written out: mean NLL of tokens n/2+1 .. n-1 of every chunk."""
    nll = []
    for chunk in chunks:
        half = len(chunk) // 2
        logits = logits_of(chunk).double()
        nll.append(F.cross_entropy(logits[half:-1], torch.tensor(chunk[half + 1 :]), reduction="none"))
    return math.exp(torch.cat(nll).mean())


def test_perplexity_matches_transformers_and_llama_cpp(text_file: Path, capsys) -> None:
    from moestream.engine import Engine

    fixture = get_fixture("olmoe")
    args = parse(add_perplexity_args, ["--model", str(fixture.gguf_path), "--text", str(text_file),
                                       "--ctx", str(N_CTX), "--chunks", str(N_CHUNKS), "--vs-llama-cpp",
                                       "--threads", "2", "--json"])
    assert perplexity_main(args) == 0
    result = json.loads(capsys.readouterr().out)
    ours, theirs = result["moestream"], result["llama_cpp"]
    assert ours["n_chunks"] == N_CHUNKS and ours["n_scored"] == N_CHUNKS * (N_CTX // 2 - 1)

    tok = Engine.from_gguf(fixture.gguf_path, ctx_size=N_CTX, max_batch=1).tokenizer
    ids = tok.encode(text_file.read_text(), add_special=True)
    chunks = make_chunks(ids, N_CTX, N_CHUNKS, tok.bos_id if tok.add_bos else None)
    expected = reference_ppl(lambda chunk: hf_logits(fixture, chunk), chunks)
    assert expected > 1.0
    assert ours["ppl"] == pytest.approx(expected, rel=1e-3)
    assert theirs["ppl"] == pytest.approx(expected, rel=0.03)


def test_llama_cpp_tokenizes_the_text_as_we_do(text_file: Path) -> None:
    """The chunks --vs-llama-cpp scores are the ones llama.cpp's perplexity would cut."""
    from moestream.engine import Engine

    fixture = get_fixture("olmoe")
    ours = Engine.from_gguf(fixture.gguf_path, ctx_size=N_CTX, max_batch=1).tokenizer.encode(
        text_file.read_text(), add_special=True)
    llm = llama_cpp.Llama(model_path=str(fixture.gguf_path), vocab_only=True, verbose=False)
    try:
        assert llm.tokenize(text_file.read_bytes(), add_bos=True) == ours
    finally:
        llm.close()


def test_make_chunks_replaces_the_first_token_with_bos() -> None:
    ids = list(range(100, 110))
    assert make_chunks(ids, 4, None, bos_id=1) == [[1, 101, 102, 103], [1, 105, 106, 107]]
    assert make_chunks(ids, 4, 1, bos_id=None) == [[100, 101, 102, 103]]


@pytest.fixture(scope="module")
def tiny_synth(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "tiny-olmoe-Q4_K_M.gguf"
    write_synthetic(path, get_preset("olmoe", "tiny"), "Q4_K_M", progress=False)
    return path


def test_bench_json_vs_llama_cpp(tiny_synth: Path, capsys) -> None:
    args = parse(add_bench_args, ["--model", str(tiny_synth), "--device", "cpu", "--threads", "1",
                                  "--prompt-tokens", "16", "--gen-tokens", "4", "--repeat", "2",
                                  "--warmup", "0", "--max-cached-experts", "4", "--vs-llama-cpp", "--json"])
    assert bench_main(args) == 0
    report = json.loads(capsys.readouterr().out)
    for name in ("moestream", "llama_cpp"):
        summary = report[name]
        assert len(summary["runs"]) == 2
        for key in ("prefill_tok_s", "decode_tok_s", "ttft_s", "host_rss_bytes"):
            assert summary[key] > 0, (name, key)
        assert summary["peak_vram_bytes"] == 0  # CPU
        # TTFT covers the prompt: prefill rate and TTFT describe the same interval
        run = summary["runs"][0]
        assert run["prefill_tok_s"] * run["ttft_s"] == pytest.approx(16)
    # 4 cache slots for 2 layers x 4 experts, top-2: some lookups hit, some copy
    assert 0 < report["moestream"]["expert_hit_rate"] < 1
    assert report["moestream"]["h2d_gb_s"] > 0


def test_every_bench_run_prefills_the_whole_prompt(tiny_synth: Path) -> None:
    """The repeats feed one prompt: with the serving default (a prefix cache) the second run
    would reuse the first's KV blocks and its "prefill" rate would time cache hits."""
    from moestream.tools.bench import MoestreamRunner
    from moestream.tools.measure import BenchConfig

    runner = MoestreamRunner(BenchConfig(str(tiny_synth), "cpu", None, None, threads=1, prompt_tokens=40,
                                         gen_tokens=2, n_cpu_moe=None))
    prompt = list(range(5, 45))
    for _ in range(2):
        runner.run(prompt, 2)
    stats = runner.engine.stats()
    assert stats["prompt_tokens_computed"] == 2 * len(prompt) and stats["prefix_cache_hits"] == 0


def test_llama_cpp_without_repack(tiny_synth: Path) -> None:
    """--llama-cpp-no-repack: llama.cpp's default model params lose their extra buffer types
    while the runner loads (no repacked copy of the weights), and come back after."""
    from moestream.tools.llama_cpp_ref import without_repack

    assert llama_cpp.llama_model_default_params().use_extra_bufts
    with without_repack(True):
        assert not llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts
        # logits_all: without it only the last row of llm.scores is written
        llm = llama_cpp.Llama(model_path=str(tiny_synth), n_ctx=32, n_threads=1, logits_all=True, verbose=False)
        try:
            llm.eval([5, 77, 300])
            assert np.isfinite(np.array(llm.scores[:3])).all()
        finally:
            llm.close()
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts
