"""The `moestream` command on real fixture files, and the one-line errors on bad ones."""

import subprocess
import sys

import gguf
import numpy as np
import pytest

from tests.fixtures.models import ARCHS, get_fixture


def moestream(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moestream.server.cli", "--log-level", "WARNING", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("arch", ARCHS)
def test_inspect_describes_the_model(arch):
    fixture = get_fixture(arch, "Q4_K_M")
    result = moestream("inspect", str(fixture.gguf_path), "--vram-budget", "64MiB")
    assert result.returncode == 0, result.stderr
    gguf_arch = "llama" if arch == "mixtral" else arch
    for text in (f"architecture    {gguf_arch}", "routed experts", "Q4_K", "chat template   yes",
                 "expert cache", "on a CUDA device"):
        assert text in result.stdout


def test_generate_streams_text():
    fixture = get_fixture("qwen3moe", "Q8_0")
    result = moestream("generate", "--model", str(fixture.gguf_path), "--prompt", "hello there",
                       "--max-tokens", "12")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) > 0


def test_generate_chat_mode():
    result = moestream("generate", "--model", str(get_fixture("olmoe").gguf_path), "--prompt", "hi",
                       "--max-tokens", "4", "--chat")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("policy", ["cpu", "auto"])
def test_generate_through_an_expert_cache_with_a_miss_policy(policy):
    fixture = get_fixture("qwen2moe", "Q4_K_M")
    result = moestream("generate", "--model", str(fixture.gguf_path), "--prompt", "hello there",
                       "--max-tokens", "6", "--max-cached-experts", "3", "--miss-policy", policy)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) > 0


def _assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_file(tmp_path):
    _assert_one_line_error(moestream("inspect", str(tmp_path / "nope.gguf")), "nope.gguf", "no such file")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    _assert_one_line_error(moestream("inspect", str(bad)), "junk.gguf", "GGUF")


def test_truncated_gguf(tmp_path):
    src = get_fixture("olmoe", "Q4_K_M").gguf_path
    data = src.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) * 2 // 3])
    _assert_one_line_error(moestream("inspect", str(cut)), "cut.gguf", "truncated")


def _rewrite(src, dst, *, arch=None, drop=None, retype=None):
    """Copy a GGUF changing the architecture name, dropping a tensor, or relabelling a
    tensor's type (the bytes are then not what the type says: the loader must notice)."""
    reader = gguf.GGUFReader(src)
    old_arch = reader.fields["general.architecture"].contents()
    new_arch = arch or old_arch
    writer = gguf.GGUFWriter(dst, new_arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_array(name.replace(old_arch, new_arch, 1), value)
        else:
            writer.add_key_value(name.replace(old_arch, new_arch, 1), value, vtype)
    for t in reader.tensors:
        if t.name == drop:
            continue
        qtype = gguf.GGMLQuantizationType(int(t.tensor_type))
        shape = tuple(reversed([int(d) for d in t.shape]))  # numpy order
        data = np.asarray(t.data)
        if t.name == retype:  # same shape, a block type moestream does not decode
            qtype = gguf.GGMLQuantizationType.TQ2_0
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            data = np.zeros((*shape[:-1], shape[-1] // block * size), dtype=np.uint8)
        writer.add_tensor(t.name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unknown_architecture(tmp_path):
    dst = tmp_path / "weird.gguf"
    _rewrite(get_fixture("olmoe").gguf_path, dst, arch="weirdmoe")
    _assert_one_line_error(moestream("inspect", str(dst)), "weird.gguf", "weirdmoe", "not supported")


def test_missing_tensor(tmp_path):
    dst = tmp_path / "holey.gguf"
    _rewrite(get_fixture("olmoe").gguf_path, dst, drop="blk.1.attn_k.weight")
    _assert_one_line_error(moestream("generate", "-m", str(dst), "-p", "x", "-n", "1"),
                           "holey.gguf", "blk.1.attn_k.weight", "missing")


def test_budget_too_small_fails_at_start(tmp_path):
    fixture = get_fixture("olmoe", "Q4_K_M")
    result = moestream("generate", "-m", str(fixture.gguf_path), "-p", "x", "-n", "1",
                       "--vram-budget", "1MiB")
    _assert_one_line_error(result, "budget")


def test_unsupported_block_type(tmp_path):
    dst = tmp_path / "ternary.gguf"
    _rewrite(get_fixture("olmoe").gguf_path, dst, retype="blk.0.attn_q.weight")
    _assert_one_line_error(moestream("inspect", str(dst)), "blk.0.attn_q.weight", "TQ2_0")
