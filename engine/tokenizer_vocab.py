"""A GGUF file's `tokenizer.ggml.*` metadata, with llama.cpp's defaults and token fix-ups.

What llama.cpp's llama_vocab::load decides beyond the raw arrays lives here: default
special ids and add_bos per tokenizer model and pre-tokenizer type, which tokens end
generation, and the tokens whose type it overrides by their text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import IntEnum

import gguf

from moestream.engine.file_check import field_value
from moestream.engine.tokenizer_pre import PreTokenizerSpec, pre_tokenizer_spec
from moestream.kernels.errors import MoestreamError

log = logging.getLogger(__name__)


class TokenType(IntEnum):
    """`tokenizer.ggml.token_type` values (llama.cpp's llama_token_type)."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# Texts llama.cpp treats as end-of-generation, and as control tokens, whatever their type.
EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
})
# gpt-oss: always rendered and always cut out of text, as llama.cpp forces.
ALWAYS_USER_DEFINED = frozenset({"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"})

_SPM_MODEL = "llama"
_BPE_MODELS = ("gpt2", "gemma4")
_UNSUPPORTED_MODELS = {
    "bert": "WordPiece (BERT)", "t5": "Unigram (T5)", "rwkv": "RWKV", "plamo2": "PLaMo-2",
    "no_vocab": "no vocabulary", "none": "no vocabulary", "hybriddna": "hybrid DNA",
    "whitespace": "whitespace", "test": "test",
}
_ALWAYS_BOS_PRE = ("gemma4", "granite-embed-multi-311m")  # llama.cpp's Gemma 4 override
_SUPPORTED = "moestream supports 'llama' (SentencePiece BPE), 'gpt2' and 'gemma4' (BPE)"


@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer of one GGUF file as llama.cpp loads it."""

    is_spm: bool  # SentencePiece BPE with scores ("llama"); else BPE with merges
    pre: PreTokenizerSpec | None  # None for SentencePiece
    tokens: list[str]
    types: list[TokenType]  # after llama.cpp's overrides by token text
    scores: list[float]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    eog_ids: frozenset[int]  # every token that ends generation
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    rstrip_special: bool  # llama.cpp's Phi-3 rule: whitespace after special tokens is dropped


def _get(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.get_field(key)
    return default if field is None else field_value(field)


def _token_id(reader: gguf.GGUFReader, key: str, default: int | None, n_vocab: int) -> int | None:
    value = _get(reader, key)
    if value is not None and 0 <= int(value) < n_vocab:
        return int(value)
    if value is not None:
        log.warning("%s = %s is outside the vocabulary; using %s", key, value, default)
    return default if default is not None and default < n_vocab else None


def _check_model(model: str | None) -> None:
    if model is None:
        raise MoestreamError("the GGUF has no tokenizer.ggml.model; reconvert it with llama.cpp's "
                             "convert_hf_to_gguf.py so that it carries its tokenizer")
    if model in _UNSUPPORTED_MODELS:
        raise MoestreamError(f"unsupported tokenizer model tokenizer.ggml.model={model!r} "
                             f"({_UNSUPPORTED_MODELS[model]}); {_SUPPORTED}")
    if model != _SPM_MODEL and model not in _BPE_MODELS:
        raise MoestreamError(f"unknown tokenizer model tokenizer.ggml.model={model!r}; {_SUPPORTED}")


def _pre_name(reader: gguf.GGUFReader, model: str) -> str:
    if model == "gemma4":
        return "gemma4"  # llama.cpp ignores tokenizer.ggml.pre for this model
    pre = _get(reader, "tokenizer.ggml.pre", "")
    if not pre:
        log.warning("the GGUF names no tokenizer.ggml.pre; using llama.cpp's 'default' split as "
                    "llama.cpp does (tokenization may differ from the original model)")
    return pre or "default"


def _fix_types(tokens: list[str], types: list[TokenType]) -> tuple[list[TokenType], set[int]]:
    """llama.cpp's overrides by token text; returns the types and the EOG tokens found."""
    types = list(types)
    eog = {i for i, t in enumerate(tokens) if t in EOG_TEXTS}
    by_text = {tokens[i]: i for i in eog}
    # gpt-oss / Solar-Open: "<|end|>" ends a message, not the generation
    if ({"<|return|>", "<|call|>"} <= by_text.keys() or {"<|calls|>", "<|flush|>"} <= by_text.keys()) \
            and "<|end|>" in by_text:
        eog.discard(by_text["<|end|>"])
        types[by_text["<|end|>"]] = TokenType.USER_DEFINED
    # Gemma 4 / PLaMo-2: "</s>" is ordinary text there
    if ("<|tool_response>" in by_text or "<|plamo:eos|>" in by_text) and "</s>" in by_text:
        eog.discard(by_text["</s>"])
        types[by_text["</s>"]] = TokenType.NORMAL
    for i in eog:
        types[i] = TokenType.CONTROL
    for i, text in enumerate(tokens):
        if text in ALWAYS_USER_DEFINED:
            types[i] = TokenType.USER_DEFINED
    return types, eog


def read_vocab(reader: gguf.GGUFReader) -> GGUFVocab:
    """Read `tokenizer.ggml.*` the way llama.cpp's llama_vocab::load does."""
    model = _get(reader, "tokenizer.ggml.model")
    _check_model(model)
    tokens = _get(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise MoestreamError("the GGUF has no tokenizer.ggml.tokens; reconvert it with llama.cpp")
    # llama.cpp renames empty tokens so that every text maps back to one id
    tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    n = len(tokens)
    raw_types = _get(reader, "tokenizer.ggml.token_type") or [TokenType.NORMAL] * n
    types, eog = _fix_types(tokens, [TokenType(int(t)) if 0 <= int(t) <= 6 else TokenType.UNDEFINED
                                     for t in raw_types])
    is_spm = model == _SPM_MODEL
    pre_name = None if is_spm else _pre_name(reader, model)
    pre = None if is_spm else pre_tokenizer_spec(pre_name)
    # BOS/EOS/UNK default to SentencePiece's 1/2/0; a BPE vocab must name its own
    default_ids = (1, 2, 0) if is_spm else (None, None, None)
    bos_id, eos_id, unk_id = (
        _token_id(reader, f"tokenizer.ggml.{key}", default, n)
        for key, default in zip(("bos_token_id", "eos_token_id", "unknown_token_id"), default_ids)
    )
    named_eog = {_token_id(reader, f"tokenizer.ggml.{key}", None, n)
                 for key in ("eot_token_id", "eom_token_id")} | {eos_id}
    add_bos = _get(reader, "tokenizer.ggml.add_bos_token", is_spm or pre.force_add_bos)
    name = str(_get(reader, "general.name", "")).lower()
    return GGUFVocab(
        is_spm=is_spm,
        pre=pre,
        tokens=tokens,
        types=types,
        scores=[float(s) for s in _get(reader, "tokenizer.ggml.scores") or [0.0] * n],
        merges=[] if is_spm else _get(reader, "tokenizer.ggml.merges", []),
        bos_id=bos_id,
        eos_id=eos_id,
        unk_id=unk_id,
        eog_ids=frozenset(eog | named_eog - {None}),
        add_bos=bool(add_bos) or pre_name in _ALWAYS_BOS_PRE,
        add_eos=bool(_get(reader, "tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=bool(_get(reader, "tokenizer.ggml.add_space_prefix", is_spm)),
        rstrip_special="phi-3" in name or "phi3" in name,
    )
