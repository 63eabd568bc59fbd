"""What the issue 19 reporter did (finding 4): corrupt single bytes across a GGUF header and
load each file the way `moestream generate` does. Each either still works, with finite
logits, or exits 2 with one line on stderr; never a traceback, never exit 1.

The corrupted bytes are a fixed set, found through gguf's reader: the header counts, the
first byte of every metadata value, token, merge and chat-template strings, and each part
of a few tensors' header entries. Most runs are in-process (a second or less each); a few
go through the `moestream` command to check its real stderr.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from moestream.engine import Engine
from moestream.engine.startup_check import probe_token_ids
from moestream.server.cli import main
from moestream.server.demo import demo_model_path
from tests.gguf_bytes import TENSOR_PARTS, count_offset, flip_byte, set_byte, tensor_offset, value_offset

STRING_ENTRIES = {"tokenizer.ggml.tokens": (0, 300, -1), "tokenizer.ggml.merges": (0, 400, -1)}
TENSORS = ("token_embd.weight", "blk.0.attn_norm.weight", "blk.2.ffn_down_exps.weight", "output.weight")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return demo_model_path(tmp_path_factory.mktemp("demo"))


def corruptions(path: Path) -> list[tuple[str, int, int]]:
    """(label, byte offset, xor) for each single-byte corruption tried."""
    reader = gguf.GGUFReader(path)
    cases = []
    for key in ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"):
        cases += [(f"{key}^{xor:#x}", count_offset(reader, key), xor) for xor in (0x01, 0x80)]
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        cases.append((f"{key}^0x80", value_offset(reader, key), 0x80))
        if field.types == [gguf.GGUFValueType.UINT32]:
            cases.append((f"{key}^0x01", value_offset(reader, key), 0x01))
            cases.append((f"{key} type^0x02", value_offset(reader, key) - 4, 0x02))  # UINT32 -> FLOAT32
    for key, entries in STRING_ENTRIES.items():
        for entry in entries:
            index = entry % len(reader.fields[key].data)
            cases += [(f"{key}[{index}]^{xor:#x}", value_offset(reader, key, index), xor) for xor in (0x01, 0x80)]
    template = value_offset(reader, "tokenizer.chat_template")
    cases += [(f"tokenizer.chat_template[+{at}]^0x80", template + at, 0x80) for at in (10, 100)]
    for name in TENSORS:
        for part in TENSOR_PARTS:
            cases.append((f"{name} {part}^0x01", tensor_offset(reader, name, part), 0x01))
    return cases


def _finite_logits(path: Path) -> bool:
    engine = Engine.from_gguf(path, kernel_backend="auto")  # exact kernels: a NaN stays a NaN
    return bool(torch.isfinite(engine.score(probe_token_ids(engine))).all())


def test_single_byte_corruptions_work_or_fail_in_one_line(demo, tmp_path, capsys):
    outcomes = {"works": 0, "refused": 0}
    for label, offset, xor in corruptions(demo):
        bad = flip_byte(demo, tmp_path / "bad.gguf", offset, xor)
        code = main(["--log-level", "WARNING", "generate", "-m", str(bad), "-p", "hi", "-n", "1"])
        err = capsys.readouterr().err
        if code == 0:
            assert _finite_logits(bad), label
            outcomes["works"] += 1
        else:
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and lines[0].startswith("moestream: error: "), (label, err)
            outcomes["refused"] += 1
    assert outcomes["refused"] >= 40 and outcomes["works"] >= 10, outcomes  # both kinds were tried


def moestream(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moestream.server.cli", "--log-level", "WARNING", *args],
                          capture_output=True, text=True, timeout=300)


def _one_line_exit_2(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_one_tensor_fewer_in_the_header(demo, tmp_path):
    # reported: every completion returned NaN (the dropped last tensor, output.weight, is
    # optional, and every other tensor's data was read 32 bytes early)
    reader = gguf.GGUFReader(demo)
    bad = set_byte(demo, tmp_path / "fewer.gguf", count_offset(reader, "GGUF.tensor_count"),
                   len(reader.tensors) - 1)
    _one_line_exit_2(moestream("generate", "-m", str(bad), "-p", "hi", "-n", "1"), "after its last tensor")


def test_flipped_expert_count(demo, tmp_path):
    # reported: every request tried to allocate 34 GB
    reader = gguf.GGUFReader(demo)
    bad = flip_byte(demo, tmp_path / "experts.gguf", value_offset(reader, "olmoe.expert_count") + 3, 0x80)
    _one_line_exit_2(moestream("inspect", str(bad)), "olmoe.expert_count")


def test_invalid_utf8_in_a_token(demo, tmp_path, capsys):
    # reported: UnicodeDecodeError traceback, exit 1
    reader = gguf.GGUFReader(demo)
    bad = flip_byte(demo, tmp_path / "token.gguf", value_offset(reader, "tokenizer.ggml.tokens", 300), 0x80)
    assert main(["generate", "-m", str(bad), "-p", "hi", "-n", "1"]) == 2
    assert "tokenizer.ggml.tokens is not valid UTF-8 (entry 300" in capsys.readouterr().err


def test_nan_weights_fail_at_start(demo, tmp_path):
    # the header is sound; the start-up forward sees the NaN
    t = next(t for t in gguf.GGUFReader(demo).tensors if t.name == "blk.1.ffn_norm.weight")
    data = bytearray(demo.read_bytes())
    data[t.data_offset:t.data_offset + 4] = np.array([np.nan], np.float32).tobytes()
    bad = tmp_path / "nan.gguf"
    bad.write_bytes(bytes(data))
    _one_line_exit_2(moestream("generate", "-m", str(bad), "-p", "hi", "-n", "1"), "start-up forward")
