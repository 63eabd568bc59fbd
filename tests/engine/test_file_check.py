"""A GGUF whose header disagrees with itself is refused by open_gguf with one line naming
the key or tensor at fault (issue 19, finding 4), before any weight is read.

Each case corrupts one byte of the demo model (what the issue's reporter served), found
through gguf's own reader, and would otherwise load: the reported outcomes were NaN
completions, 34 GB allocations per request and UnicodeDecodeError tracebacks.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from moestream.engine.loader import open_gguf
from moestream.engine.tokenizer import Tokenizer
from moestream.kernels.errors import MoestreamError
from moestream.server.demo import demo_model_path
from tests.gguf_bytes import count_offset, flip_byte, set_byte, tensor_offset, value_offset


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return demo_model_path(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def reader(demo) -> gguf.GGUFReader:
    return gguf.GGUFReader(demo)


def _refused(path: Path, *needles: str) -> str:
    with pytest.raises(MoestreamError) as err:
        open_gguf(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_the_demo_model_passes(demo):
    assert open_gguf(demo).config.n_experts == 16


def test_one_tensor_fewer_in_the_header(demo, reader, tmp_path):
    # the reported case: the last tensor is output.weight, which the model may lack (it then
    # ties the head to token_embd), so without the layout check the file loads with every
    # tensor's data read from the wrong place
    assert reader.tensors[-1].name == "output.weight"
    n_tensors = len(reader.tensors)
    assert n_tensors < 256
    bad = set_byte(demo, tmp_path / "fewer.gguf", count_offset(reader, "GGUF.tensor_count"), n_tensors - 1)
    _refused(bad, "after its last tensor", "download the file again")


def test_flipped_expert_count(demo, reader, tmp_path):
    # the top bit of the uint32: 2**31 + 16 experts, which made every request allocate GBs
    bad = flip_byte(demo, tmp_path / "experts.gguf", value_offset(reader, "olmoe.expert_count") + 3, 0x80)
    _refused(bad, "olmoe.expert_count = 2147483664", "blk.0.ffn_gate_inp.weight")


def test_expert_count_of_the_wrong_type(demo, reader, tmp_path):
    # UINT32 (4) -> FLOAT32 (6): same size, so the rest of the header still parses
    type_byte = value_offset(reader, "olmoe.expert_count") - 4
    assert (demo.read_bytes()[type_byte], gguf.GGUFValueType.UINT32) == (4, 4)
    bad = flip_byte(demo, tmp_path / "typed.gguf", type_byte, 0x02)
    _refused(bad, "olmoe.expert_count", "must be an integer")


@pytest.mark.parametrize("key, entry", [
    ("tokenizer.ggml.tokens", 5), ("tokenizer.ggml.tokens", 1023), ("tokenizer.ggml.merges", 0),
    ("tokenizer.ggml.merges", 700), ("tokenizer.chat_template", 0), ("general.name", 0),
])
def test_invalid_utf8(demo, reader, tmp_path, key, entry):
    # XOR 0x80 on a string's first byte always breaks UTF-8: an ASCII byte becomes a lone
    # continuation or a lead byte without its continuation, and a lead byte becomes ASCII
    # followed by an orphaned continuation byte
    bad = flip_byte(demo, tmp_path / "utf8.gguf", value_offset(reader, key, entry), 0x80)
    message = _refused(bad, f"metadata {key} is not valid UTF-8")
    if key.startswith("tokenizer.ggml."):
        assert f"entry {entry}:" in message


def test_the_tokenizer_reports_invalid_utf8_by_key(demo, reader, tmp_path):
    bad = flip_byte(demo, tmp_path / "utf8.gguf", value_offset(reader, "tokenizer.ggml.tokens", 7), 0x80)
    with pytest.raises(MoestreamError, match="tokenizer.ggml.tokens is not valid UTF-8"):
        Tokenizer.from_gguf(bad)


@pytest.mark.parametrize("tensor, xor, needles", [
    ("blk.0.attn_norm.weight", 0x01, ("[257]", "olmoe.embedding_length = 256")),
    ("output_norm.weight", 0x80, ("[384]", "olmoe.embedding_length = 256")),
])
def test_a_tensor_dim_that_disagrees_with_the_metadata(demo, reader, tmp_path, tensor, xor, needles):
    bad = flip_byte(demo, tmp_path / "dim.gguf", tensor_offset(reader, tensor, "dims"), xor)
    _refused(bad, f"tensor {tensor!r} is", *needles)


@pytest.mark.parametrize("tensor, part", [
    ("blk.0.attn_norm.weight", "type"),  # F32 -> F16: half the bytes, the next tensor moves
    ("blk.0.attn_q.weight", "offset"),
    ("output_norm.weight", "offset"),
])
def test_tensor_data_out_of_place(demo, reader, tmp_path, tensor, part):
    bad = flip_byte(demo, tmp_path / "layout.gguf", tensor_offset(reader, tensor, part), 0x01)
    _refused(bad, "starts at byte", "the tensors before it end at", "download the file again")


def test_a_tensor_name_the_architecture_lacks(demo, reader, tmp_path):
    # "output.weight" -> "outqut.weight": the model would silently tie its head to token_embd
    bad = flip_byte(demo, tmp_path / "name.gguf", tensor_offset(reader, "output.weight", "name") + 3, 0x01)
    _refused(bad, "'outqut.weight' is not one a olmoe model has")



@pytest.mark.parametrize("key, byte, xor, needles", [
    ("olmoe.block_count", 0, 0x01, ("block_count = 5", "tensors for 4 layers")),
    ("olmoe.expert_used_count", 0, 0x80, ("expert_used_count = 130", "at most expert_count (16)")),
    ("olmoe.attention.head_count_kv", 0, 0x01, ("head_count_kv = 5", "divisor")),
    ("olmoe.attention.head_count", 0, 0x80, ("'blk.0.attn_q.weight'", "head_count x key_length = 8448")),
    ("olmoe.rope.dimension_count", 0, 0x01, ("rope.dimension_count = 65",)),
    ("olmoe.attention.value_length", 0, 0x01, ("value_length = 65",)),
    ("olmoe.attention.layer_norm_rms_epsilon", 3, 0x80, ("layer_norm_rms_epsilon = -", "positive")),
    ("olmoe.rope.freq_base", 3, 0x80, ("rope.freq_base = -10000.0", "positive")),
])
def test_metadata_out_of_range(demo, reader, tmp_path, key, byte, xor, needles):
    bad = flip_byte(demo, tmp_path / "meta.gguf", value_offset(reader, key) + byte, xor)
    _refused(bad, key, *needles)
