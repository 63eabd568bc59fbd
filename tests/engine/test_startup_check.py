"""The start-up forward refuses weights that the header checks cannot see (issue 19,
finding 4): a NaN or inf in the tensor data makes every completion NaN (or, through the
int8 CPU kernels, the same logit for every token)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from moestream.engine import Engine
from moestream.engine.startup_check import check_startup_forward, probe_token_ids
from moestream.kernels.errors import MoestreamError
from moestream.server.demo import demo_model_path

BACKENDS = ("auto", "q8")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return demo_model_path(tmp_path_factory.mktemp("demo"))


def with_data(src: Path, dst: Path, tensor: str, value: np.ndarray) -> Path:
    """A copy of `src` whose tensor data starts with `value`'s bytes (the header untouched)."""
    t = next(t for t in gguf.GGUFReader(src).tensors if t.name == tensor)
    data = bytearray(src.read_bytes())
    raw = value.tobytes()
    data[t.data_offset:t.data_offset + len(raw)] = raw
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sound_model_passes(demo, backend):
    engine = Engine.from_gguf(demo, kernel_backend=backend)
    ids = probe_token_ids(engine)
    assert 1 < len(ids) <= 8 and all(0 <= i < engine.config.vocab_size for i in ids)
    check_startup_forward(engine)
    assert engine.kv.usage == 0  # the probe's KV blocks are given back


@pytest.mark.parametrize("backend, needle", [("auto", "NaN or inf"), ("q8", "the same logit")])
def test_a_nan_weight_fails_at_start(demo, tmp_path, backend, needle):
    bad = with_data(demo, tmp_path / "nan.gguf", "blk.1.ffn_norm.weight", np.array([np.nan], np.float32))
    engine = Engine.from_gguf(bad, kernel_backend=backend)
    with pytest.raises(MoestreamError, match=needle) as err:
        check_startup_forward(engine)
    assert str(bad) in str(err.value) and "download the file again" in str(err.value)


def test_an_infinite_block_scale_fails_at_start(demo, tmp_path):
    # the fp16 scale d opens each Q4_K block
    q = next(t for t in gguf.GGUFReader(demo).tensors if t.name == "blk.0.attn_q.weight")
    assert q.tensor_type == gguf.GGMLQuantizationType.Q4_K
    bad = with_data(demo, tmp_path / "inf.gguf", "blk.0.attn_q.weight", np.array([np.inf], np.float16))
    with pytest.raises(MoestreamError, match="NaN or inf"):
        check_startup_forward(Engine.from_gguf(bad, kernel_backend="auto"))
