"""Write a GGUF file from an architecture's metadata, llama.cpp-named tensors and a vocab.

Shared by the test fixtures (random-weight models checked against transformers and
llama.cpp) and `moestream synth` / `--demo` (a synthetic model to serve without a
download). Metadata keys and tensor names are llama.cpp's; nothing here knows about
transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np

from moestream.kernels.errors import MoestreamError

CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# gpt-oss's harmony format: messages are <|start|>ROLE[<|channel|>C]<|message|>TEXT<|end|>;
# the assistant's turn ends with <|return|> (answer) or <|call|> (tool call)
HARMONY_CONTROL_TOKENS = ("<|endoftext|>", "<|start|>", "<|channel|>", "<|message|>", "<|constrain|>",
                          "<|end|>", "<|return|>", "<|call|>")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# A minimal harmony template written from OpenAI's format description (not gpt-oss's own
# template, which also renders tools and reasoning effort): enough for the server to
# recognise the format and split the analysis channel from the final one.
HARMONY_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|start|>assistant<|channel|>final<|message|>' + message['content'] + '<|end|>' }}"
    "{% else %}"
    "{{ '<|start|>' + message['role'] + '<|message|>' + message['content'] + '<|end|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start|>assistant' }}{% endif %}"
)

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


class BpeVocab(NamedTuple):
    """A byte-level BPE vocab in GGUF form (`tokenizer.ggml.*` with model "gpt2")."""

    tokens: list[str]
    token_types: list[gguf.TokenType]
    merges: list[str]
    eos_token: str = "<|im_end|>"

    @property
    def bos_id(self) -> int:
        return self.tokens.index("<|endoftext|>")

    @property
    def eos_id(self) -> int:
        return self.tokens.index(self.eos_token)


@dataclass(frozen=True)
class QuantizedTensor:
    """Already-quantized GGUF blocks: uint8 rows of `qtype` blocks, shape [..., rows, row_bytes]."""

    data: np.ndarray
    qtype: gguf.GGMLQuantizationType

    def __post_init__(self) -> None:
        assert self.data.dtype == np.uint8, "quantized tensors are raw uint8 block bytes"


TensorData = np.ndarray | QuantizedTensor


@dataclass(frozen=True)
class ModelMetadata:
    """The `{arch}.*` hyperparameters llama.cpp reads for the MoE architectures."""

    arch: str  # general.architecture: "olmoe", "qwen2moe", "qwen3moe", "llama" (Mixtral)
    name: str
    n_layers: int
    n_embd: int
    n_ff: int  # feed_forward_length: the expert width for olmoe and llama (Mixtral)
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    rope_freq_base: float
    rms_eps: float
    n_expert: int
    n_expert_used: int
    n_ff_exp: int | None = None  # expert_feed_forward_length (qwen2moe, qwen3moe)
    n_ff_shexp: int | None = None  # expert_shared_feed_forward_length (qwen2moe)
    file_type: gguf.LlamaFileType = gguf.LlamaFileType.ALL_F32


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, as byte-level BPE vocabs spell them."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def byte_level_bpe_vocab(n_tokens: int, controls: tuple[str, ...] = CONTROL_TOKENS,
                         eos_token: str = "<|im_end|>") -> BpeVocab:
    """`n_tokens` tokens: the 256 bytes, merges of lowercase words, then the control tokens
    (ChatML's by default; "<|endoftext|>" among them is the BOS).

    Merges grow words breadth-first from " " and the letters ("Ġa", "aa", ..., "Ġaa", ...),
    so every merge joins two existing tokens into one that is also in the vocab.
    """
    assert "<|endoftext|>" in controls and eos_token in controls
    n_merges = n_tokens - 256 - len(controls)
    if n_merges < 1:
        raise MoestreamError(f"a byte-level BPE vocab needs at least {256 + len(controls) + 1} "
                             f"tokens, got {n_tokens}; ask for a larger vocab size")
    byte_chars = _bytes_to_unicode()
    tokens = [byte_chars[b] for b in range(256)]
    merges: list[str] = []
    prefixes = [byte_chars[ord(" ")], *_LETTERS]
    while len(merges) < n_merges:
        prefix = prefixes.pop(0)
        for letter in _LETTERS[: n_merges - len(merges)]:
            merges.append(f"{prefix} {letter}")
            tokens.append(prefix + letter)
            prefixes.append(prefix + letter)
    tokens.extend(controls)
    types = [gguf.TokenType.NORMAL] * (n_tokens - len(controls))
    types += [gguf.TokenType.CONTROL] * len(controls)
    return BpeVocab(tokens, types, merges, eos_token)


def _add_hparams(writer: gguf.GGUFWriter, meta: ModelMetadata, n_vocab: int) -> None:
    writer.add_name(meta.name)
    writer.add_file_type(meta.file_type)
    writer.add_block_count(meta.n_layers)
    writer.add_context_length(meta.n_ctx)
    writer.add_embedding_length(meta.n_embd)
    writer.add_feed_forward_length(meta.n_ff)
    writer.add_head_count(meta.n_head)
    writer.add_head_count_kv(meta.n_head_kv)
    writer.add_key_length(meta.head_dim)
    writer.add_value_length(meta.head_dim)
    writer.add_rope_dimension_count(meta.head_dim)
    writer.add_rope_freq_base(meta.rope_freq_base)
    writer.add_layer_norm_rms_eps(meta.rms_eps)
    writer.add_expert_count(meta.n_expert)
    writer.add_expert_used_count(meta.n_expert_used)
    writer.add_vocab_size(n_vocab)
    if meta.n_ff_exp is not None:
        writer.add_expert_feed_forward_length(meta.n_ff_exp)
    if meta.n_ff_shexp is not None:
        writer.add_expert_shared_feed_forward_length(meta.n_ff_shexp)


def add_tokenizer(writer: gguf.GGUFWriter, vocab: BpeVocab, chat_template: str) -> None:
    writer.add_tokenizer_model("gpt2")
    # "gpt-2" selects GPT-2's pre-tokenizer regex in llama.cpp, the same split that
    # a `tokenizers` ByteLevel pre-tokenizer makes.
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_pad_token_id(vocab.bos_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(chat_template)


def write_gguf(path: Path, meta: ModelMetadata, tensors: Mapping[str, TensorData],
               vocab: BpeVocab, chat_template: str = CHATML_TEMPLATE) -> None:
    """Write `tensors` (numpy shapes: GGUF dims reversed, e.g. experts [n_expert, rows, cols])."""
    writer = gguf.GGUFWriter(path, meta.arch)
    _add_hparams(writer, meta, len(vocab.tokens))
    add_tokenizer(writer, vocab, chat_template)
    for name, tensor in tensors.items():
        if isinstance(tensor, QuantizedTensor):
            writer.add_tensor(name, tensor.data, raw_dtype=tensor.qtype)
        else:
            writer.add_tensor(name, np.ascontiguousarray(tensor))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
