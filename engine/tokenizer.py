"""The model's tokenizer, rebuilt from GGUF `tokenizer.ggml.*` metadata to match llama.cpp.

Encoding runs in a `tokenizers.Tokenizer` assembled from the metadata: byte-level BPE with
the merges and llama.cpp's split regexes for `tokenizer.ggml.pre` (model "gpt2"), or
SentencePiece BPE with merges ranked by the vocab scores and byte fallback (model "llama").
Control and unknown tokens become special added tokens (matched only when parse_special),
user-defined ones non-special added tokens (always matched), as llama.cpp partitions text.
Decoding concatenates each token's bytes as llama.cpp's token_to_piece does, so streamed
text and byte-level pieces agree with llama.cpp exactly.
"""

from __future__ import annotations

import codecs
import logging
import threading
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import gguf
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from engine.tokenizer_pre import PreTokenizerSpec, pre_tokenizer_spec
from kernels.errors import MoestreamError

log = logging.getLogger(__name__)

SPACE_MARK = "\u2581"  # SentencePiece's visible space


class TokenType(IntEnum):
    """`tokenizer.ggml.token_type` values (llama.cpp's llama_token_type)."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# Texts llama.cpp treats as end-of-generation (and as control tokens) whatever their type.
EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
    "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
    "<eos>", "<turn|>", "<｜end▁of▁sentence｜>",
})

_UNSUPPORTED_MODELS = {
    "bert": "WordPiece (BERT)", "t5": "Unigram (T5)", "rwkv": "RWKV", "plamo2": "PLaMo-2",
    "no_vocab": "no vocabulary", "none": "no vocabulary", "hybriddna": "hybrid DNA",
    "whitespace": "whitespace", "test": "test",
}


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the byte-level alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in byte_to_unicode().items()}


@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer metadata of one GGUF file, with llama.cpp's defaults applied."""

    model: str  # "llama" (SentencePiece) or "gpt2" (BPE with merges)
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    eom_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    rstrip_special: bool  # llama.cpp's Phi-3 rule: whitespace after special tokens is dropped

    @property
    def is_spm(self) -> bool:
        return self.model == "llama"


def _get(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _token_id(reader: gguf.GGUFReader, key: str, default: int | None, n_vocab: int) -> int | None:
    value = _get(reader, key)
    if value is not None and 0 <= int(value) < n_vocab:
        return int(value)
    if value is not None:
        log.warning("%s = %s is outside the vocabulary; using %s", key, value, default)
    return default if default is not None and default < n_vocab else None


def read_vocab(reader: gguf.GGUFReader) -> GGUFVocab:
    """Read `tokenizer.ggml.*` the way llama.cpp's llama_vocab::load does."""
    model = _get(reader, "tokenizer.ggml.model")
    if model is None:
        raise MoestreamError("the GGUF has no tokenizer.ggml.model; reconvert it with llama.cpp's "
                             "convert_hf_to_gguf.py so it carries its tokenizer")
    if model in _UNSUPPORTED_MODELS:
        raise MoestreamError(f"unsupported tokenizer model tokenizer.ggml.model={model!r} "
                             f"({_UNSUPPORTED_MODELS[model]}); moestream supports 'llama' "
                             "(SentencePiece BPE), 'gpt2' and 'gemma4' (BPE)")
    if model not in ("llama", "gpt2", "gemma4"):
        raise MoestreamError(f"unknown tokenizer model tokenizer.ggml.model={model!r}; moestream "
                             "supports 'llama' (SentencePiece BPE), 'gpt2' and 'gemma4' (BPE)")
    tokens = _get(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise MoestreamError("the GGUF has no tokenizer.ggml.tokens; reconvert it with llama.cpp")
    # llama.cpp renames empty tokens so every text maps back to one id
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    n = len(tokens)
    types = _get(reader, "tokenizer.ggml.token_type") or [TokenType.NORMAL] * n
    scores = _get(reader, "tokenizer.ggml.scores") or [0.0] * n
    is_spm = model == "llama"
    if is_spm:
        pre, spec = "default", None
    else:
        pre = "gemma4" if model == "gemma4" else _get(reader, "tokenizer.ggml.pre", "")
        if not pre:
            log.warning("the GGUF names no tokenizer.ggml.pre; using llama.cpp's 'default' split "
                        "as llama.cpp does (tokenization may differ from the original model)")
            pre = "default"
        spec = pre_tokenizer_spec(pre)
    add_bos = _get(reader, "tokenizer.ggml.add_bos_token", is_spm or spec.force_add_bos)
    if pre == "gemma4":
        add_bos = True  # llama.cpp overrides it for Gemma 4
    name = str(_get(reader, "general.name", "")).lower()
    return GGUFVocab(
        model="llama" if is_spm else "gpt2",
        pre=pre,
        tokens=tokens,
        types=[int(t) for t in types],
        scores=[float(s) for s in scores],
        merges=_get(reader, "tokenizer.ggml.merges", []) if not is_spm else [],
        bos_id=_token_id(reader, "tokenizer.ggml.bos_token_id", 1 if is_spm else None, n),
        eos_id=_token_id(reader, "tokenizer.ggml.eos_token_id", 2 if is_spm else None, n),
        eot_id=_token_id(reader, "tokenizer.ggml.eot_token_id", None, n),
        eom_id=_token_id(reader, "tokenizer.ggml.eom_token_id", None, n),
        unk_id=_token_id(reader, "tokenizer.ggml.unknown_token_id", 0 if is_spm else None, n),
        add_bos=bool(add_bos),
        add_eos=bool(_get(reader, "tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=bool(_get(reader, "tokenizer.ggml.add_space_prefix", is_spm)),
        rstrip_special="phi-3" in name or "phi3" in name,
    )


def _spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every pair whose concatenation is a token, best score first.

    SentencePiece BPE (and llama.cpp) merge the adjacent pair whose joined text is the
    vocab entry with the highest score; as ranked merges that is this list.
    """
    ids = {t: i for i, t in enumerate(tokens)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for i, text in enumerate(tokens):
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[i], i, cut, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _bpe_merges(vocab: GGUFVocab, ids: dict[str, int]) -> list[tuple[str, str]]:
    merges = []
    for line in vocab.merges:
        cut = line.find(" ", 1)  # as llama.cpp: the first space after the first character
        left, right = line[:cut], line[cut + 1:]
        if cut > 0 and left in ids and right in ids and left + right in ids:
            merges.append((left, right))
    if len(merges) < len(vocab.merges):
        log.info("dropped %d merges whose parts are not in the vocabulary",
                 len(vocab.merges) - len(merges))
    return merges


def _bpe_pipeline(hf: HFTokenizer, spec: PreTokenizerSpec) -> None:
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in spec.regexes]
    if spec.byte_level:
        splits.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence(splits)
    if spec.escape_whitespace:
        hf.normalizer = normalizers.Replace(" ", SPACE_MARK)


def build_hf_tokenizer(vocab: GGUFVocab, special_ids: set[int]) -> HFTokenizer:
    """The `tokenizers` pipeline that encodes like llama.cpp for this vocabulary."""
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    unk = vocab.tokens[vocab.unk_id] if vocab.unk_id is not None else None
    if vocab.is_spm:
        model = models.BPE(ids, _spm_merges(vocab.tokens, vocab.scores), unk_token=unk,
                           byte_fallback=True)
        hf = HFTokenizer(model)
        steps = [normalizers.Prepend(SPACE_MARK)] if vocab.add_space_prefix else []
        hf.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE_MARK)])
    else:
        spec = pre_tokenizer_spec(vocab.pre)
        model = models.BPE(ids, _bpe_merges(vocab, ids), ignore_merges=spec.ignore_merges,
                           byte_fallback=not spec.byte_level)
        hf = HFTokenizer(model)
        _bpe_pipeline(hf, spec)
        hf.decoder = decoders.ByteLevel() if spec.byte_level else None
    _add_partition_tokens(hf, vocab, special_ids)
    return hf


def _add_partition_tokens(hf: HFTokenizer, vocab: GGUFVocab, special_ids: set[int]) -> None:
    """Tokens llama.cpp cuts out of the text before the model sees it."""
    keep = {"<unk>", "<s>", "<|endoftext|>"}  # the Phi-3 rule spares these
    def added(i: int, special: bool) -> AddedToken:
        text = vocab.tokens[i]
        rstrip = vocab.rstrip_special and text not in keep
        return AddedToken(text, special=special, normalized=False, rstrip=rstrip)
    user = [added(i, False) for i, t in enumerate(vocab.types)
            if t == TokenType.USER_DEFINED and i not in special_ids]
    hf.add_tokens(user)
    hf.add_special_tokens([added(i, True) for i in sorted(special_ids)])


class Tokenizer:
    """Encode/decode with llama.cpp's results; ids are the GGUF vocabulary's ids."""

    def __init__(self, vocab: GGUFVocab):
        self.vocab = vocab
        self._eos_ids = frozenset(self._find_eog_ids())
        special = {i for i, t in enumerate(vocab.types)
                   if t in (TokenType.CONTROL, TokenType.UNKNOWN)} | set(self._eos_ids)
        self._special_ids = frozenset(special)
        self._hf = build_hf_tokenizer(vocab, special)
        self._pieces = [self._piece(i) for i in range(len(vocab.tokens))]
        self._lock = threading.Lock()  # encode_special_tokens is state on the shared pipeline

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        return cls.from_reader(gguf.GGUFReader(str(path)))

    @classmethod
    def from_reader(cls, reader: gguf.GGUFReader) -> Tokenizer:
        return cls(read_vocab(reader))

    def _find_eog_ids(self) -> set[int]:
        v = self.vocab
        named = {v.eos_id, v.eot_id, v.eom_id} - {None}
        return named | {i for i, t in enumerate(v.tokens) if t in EOG_TEXTS}

    def _piece(self, token_id: int) -> bytes:
        """llama.cpp's token_to_piece with special=True, before any leading-space strip."""
        text, kind = self.vocab.tokens[token_id], self.vocab.types[token_id]
        if token_id in self._special_ids or kind == TokenType.USER_DEFINED:
            return text.encode()
        if kind == TokenType.BYTE:
            return bytes([int(text[3:5], 16)])
        if kind != TokenType.NORMAL:
            return b""
        if self.vocab.is_spm or pre_tokenizer_spec(self.vocab.pre).escape_whitespace:
            return text.replace(SPACE_MARK, " ").encode()
        # a character outside the byte alphabet (a malformed vocab) stands for itself
        return b"".join(bytes([_UNICODE_TO_BYTE[c]]) if c in _UNICODE_TO_BYTE else c.encode()
                        for c in text)

    # -- properties ------------------------------------------------------------------
    @property
    def bos_id(self) -> int | None:
        return self.vocab.bos_id

    @property
    def eos_id(self) -> int | None:
        return self.vocab.eos_id

    @property
    def eos_ids(self) -> frozenset[int]:
        """Every token that ends generation (EOS, EOT, EOM and llama.cpp's EOG texts)."""
        return self._eos_ids

    @property
    def vocab_size(self) -> int:
        return len(self.vocab.tokens)

    @property
    def add_bos(self) -> bool:
        return self.vocab.add_bos

    def token_text(self, token_id: int) -> str:
        """The token as written in the vocabulary (e.g. 'ĠHello', '▁Hello', '<|im_end|>')."""
        return self.vocab.tokens[token_id]

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    # -- encode / decode -------------------------------------------------------------
    def encode(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        """Token ids of `text`; add_special adds BOS/EOS where the model asks for them,
        parse_special lets control-token text (e.g. '<|im_start|>') become that token."""
        with self._lock:
            self._hf.encode_special_tokens = not parse_special
            ids = self._hf.encode(text, add_special_tokens=False).ids
        if add_special and self.vocab.add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_special and self.vocab.add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def token_bytes(self, token_id: int, skip_special: bool = False) -> bytes:
        """The bytes a token stands for (a byte-level token may be part of a character)."""
        if skip_special and token_id in self._special_ids:
            return b""
        return self._pieces[token_id]

    def decode_token(self, token_id: int) -> str:
        return self._pieces[token_id].decode("utf-8", errors="replace")

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """Text of `ids` as llama.cpp's detokenize gives it (without its space clean-up):
        with a SentencePiece space prefix the first token's leading space is dropped."""
        ids = list(ids)
        strip_space = self.vocab.add_space_prefix
        if skip_special and self.vocab.add_bos and ids[:1] == [self.bos_id]:
            ids, strip_space = ids[1:], False
        if skip_special and self.vocab.add_eos and ids[-1:] == [self.eos_id]:
            ids = ids[:-1]
        pieces = [self.token_bytes(i, skip_special) for i in ids]
        if strip_space and pieces and pieces[0].startswith(b" "):
            pieces[0] = pieces[0][1:]
        return b"".join(pieces).decode("utf-8", errors="replace")


class StreamDecoder:
    """Turns generated token ids into text deltas, holding back partial UTF-8 characters."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text completed by this token (may be '' while a character is incomplete)."""
        return self._utf8.decode(self.tokenizer.token_bytes(token_id, self.skip_special))

    def flush(self) -> str:
        """What is left at the end; an incomplete character becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)
