"""Synthetic models: llama.cpp loads and runs them, and their per-tensor quant mix is the one
llama-quantize itself picks for the same shapes (its dry run on a zero-filled F16 file)."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from moestream.tools.synth import PRESETS, get_preset, plan, write_synthetic
from moestream.kernels.errors import MoestreamError

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the reference")

FULL_PRESETS = [(arch, name) for arch, presets in PRESETS.items() for name in presets if name != "tiny"]
_LOG_LINE = re.compile(r"\]\s+(\S+)\s+- \[[^\]]*\], type =\s+(\w+), size =[^\n]*?(?:\((\w+)\))?\n")


def llama_quantize_types(src: Path, quant: str) -> dict[str, tuple[str, str]]:
    """{tensor: (type in src, type llama-quantize would give it)}, read from its dry-run log."""
    from llama_cpp import _logger

    from tests.fixtures.quantize import llama_ftype

    text: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, message: bytes, user_data: ctypes.c_void_p) -> None:
        text.append(message.decode("utf-8", "replace"))

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_ftype(quant)
    params.dry_run = True
    params.allow_requantize = True
    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(src.with_suffix(".out")).encode(),
                                                ctypes.byref(params))
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    assert status == 0, "".join(text)[-2000:]
    return {name: (old.upper(), (new or old).upper()) for name, old, new in _LOG_LINE.findall("".join(text))}


@pytest.mark.parametrize("arch,name", FULL_PRESETS)
def test_full_preset_mix_matches_llama_quantize(tmp_path: Path, arch: str, name: str) -> None:
    """llama-quantize's dry run on a zero-filled F16 file of the preset picks our types."""
    preset = get_preset(arch, name)
    source = tmp_path / "f16.gguf"
    write_synthetic(source, preset, "F16", random_weights=False, progress=False)
    quants = {"olmoe": ["Q4_K_M", "Q3_K_M", "IQ4_XS"], "gpt-oss": ["MXFP4_MOE"]}.get(arch, ["Q4_K_M"])
    for quant in quants:
        expected = {tensor: new for tensor, (_, new) in llama_quantize_types(source, quant).items()}
        assert {t.name: t.qtype.name for t in plan(preset, quant)} == expected, quant


# Sizes of published files made by llama-quantize: OLMoE-1B-7B-0924 Q4_K_M 4.21 GB;
# Qwen3-30B-A3B Q4_K_M 17.28 GiB and Q8_0 32.48 GB (bartowski's list).
PUBLISHED_BYTES = [("olmoe", "olmoe-1b-7b", "Q4_K_M", 4.21e9), ("qwen3moe", "qwen3-30b-a3b", "Q4_K_M", 17.28 * 2**30),
                   ("qwen3moe", "qwen3-30b-a3b", "Q8_0", 32.48e9)]


@pytest.mark.parametrize("arch,name,quant,size", PUBLISHED_BYTES)
def test_full_preset_file(tmp_path: Path, arch: str, name: str, quant: str, size: float) -> None:
    """llama.cpp reads the written header back as planned, would re-quantize nothing, and the
    file is as large as the published one (weights left as a sparse hole: no GBs written)."""
    preset = get_preset(arch, name)
    path = tmp_path / "model.gguf"
    tensors = write_synthetic(path, preset, quant, random_weights=False, progress=False)
    read = llama_quantize_types(path, quant)
    assert read == {t.name: (t.qtype.name, t.qtype.name) for t in tensors}
    assert path.stat().st_size == pytest.approx(size, rel=0.005)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synth")
    files = {}
    for arch in PRESETS:
        files[arch] = root / f"{arch}.gguf"
        # seed 2: with numpy's generator, seed 1 draws a tiny Mixtral on which llama.cpp's
        # 8-bit activations move the logits further (correlation 0.988 with f16 or f32 KV)
        write_synthetic(files[arch], get_preset(arch, "tiny"), "Q4_K_M", seed=2, progress=False)
    return files


def llama_cpp_logits(path: Path, ids: list[int]) -> torch.Tensor:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, n_threads=2, verbose=False)
    try:
        llm.eval(ids)
        return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    finally:
        llm.close()


IDS = [5, 77, 300, 12, 140, 9, 250, 33]


@pytest.mark.parametrize("arch", list(PRESETS))
def test_tiny_preset_runs_in_llama_cpp_and_engine(tiny_files: dict[str, Path], arch: str) -> None:
    from moestream.engine import Engine
    from moestream.engine.config import ARCHITECTURES

    theirs = llama_cpp_logits(tiny_files[arch], IDS)
    assert theirs.shape == (len(IDS), get_preset(arch, "tiny").n_vocab)
    assert torch.isfinite(theirs).all() and theirs.std() > 0.1, "random weights give spread-out logits"
    if arch not in ARCHITECTURES:  # written for llama.cpp, not served by us yet
        with pytest.raises(MoestreamError, match="not supported"):
            Engine.from_gguf(tiny_files[arch], ctx_size=64, max_batch=1)
        return
    ours = Engine.from_gguf(tiny_files[arch], ctx_size=64, max_batch=1).score(IDS)
    # llama.cpp rounds activations to 8 bits for K-quant dot products: close, not equal
    assert torch.corrcoef(torch.stack([ours.flatten(), theirs.flatten()]))[0, 1] > 0.99


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q8_0", "Q5_K_M", "MXFP4_MOE"])
def test_fast_random_blocks_decode_finite_with_the_planned_spread(quant: str) -> None:
    """numpy's bulk bytes with finite scales: gguf's dequantizer reads finite weights whose
    standard deviation is about 1/sqrt(row length), as the forward needs."""
    import gguf

    from moestream.tools.synth import _chunks

    for t in plan(get_preset("olmoe", "tiny"), quant)[:12]:
        data = b"".join(_chunks(t, np.random.default_rng(5)))
        assert len(data) == t.nbytes
        if t.qtype.name == "F32":
            continue
        w = gguf.quants.dequantize(np.frombuffer(data, np.uint8).reshape(t.n_rows, t.row_bytes), t.qtype)
        assert np.isfinite(w).all()
        assert np.std(w) == pytest.approx(1 / np.sqrt(t.shape[-1]), rel=0.15), t.name


def test_synthetic_gpt_oss_speaks_harmony(tiny_files: dict[str, Path]) -> None:
    """The gpt-oss file carries harmony's control tokens and a harmony template, so a served
    synthetic gpt-oss splits reasoning from content as the real file does; llama.cpp reads
    the same tokens and the same end of generation."""
    from moestream.engine.loader import open_gguf
    from moestream.engine.tokenizer import Tokenizer
    from moestream.server.harmony import is_harmony

    path = tiny_files["gpt-oss"]
    tok = Tokenizer.from_gguf(path)
    assert is_harmony(open_gguf(path).meta.get("tokenizer.chat_template"))
    prompt = "<|start|>user<|message|>hello there<|end|><|start|>assistant"
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, vocab_only=True, verbose=False)
    try:
        theirs = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        assert tok.encode(prompt, parse_special=True) == theirs
        assert tok.token_text(llm.token_eos()) == "<|return|>"
    finally:
        llm.close()
    ends = {tok.token_text(i) for i in tok.eos_ids}
    assert {"<|return|>", "<|call|>"} <= ends and "<|end|>" not in ends, "<|end|> ends a message, not the turn"
