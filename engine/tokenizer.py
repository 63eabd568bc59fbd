"""The model's tokenizer, rebuilt from GGUF metadata to give llama.cpp's token ids.

Encoding runs in a `tokenizers.Tokenizer` assembled from the metadata: byte-level BPE with
the file's merges behind llama.cpp's split regexes for `tokenizer.ggml.pre` (model "gpt2"),
or SentencePiece BPE with merges ranked by the vocab scores and byte fallback (model
"llama"). Control and unknown tokens become special added tokens (cut out of the text only
with parse_special), user-defined ones non-special added tokens (always cut out), which is
how llama.cpp partitions text. Decoding joins each token's bytes as llama.cpp's
token_to_piece gives them, so streamed text and byte-level pieces agree with llama.cpp.
"""

from __future__ import annotations

import codecs
import threading
from pathlib import Path

import gguf
from tokenizers import AddedToken, Regex, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from moestream.engine.tokenizer_vocab import GGUFVocab, TokenType, read_vocab

SPACE_MARK = "\u2581"  # SentencePiece's visible space
_SPECIAL_TYPES = (TokenType.CONTROL, TokenType.UNKNOWN)
_PHI3_NO_RSTRIP = frozenset({"<unk>", "<s>", "<|endoftext|>"})  # llama.cpp's Phi-3 exceptions


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the byte-level alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for extra, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + extra)
    return table


# str.translate table from the byte alphabet back to code points 0-255, i.e. latin-1 bytes
_BYTE_ALPHABET = {ord(c): b for b, c in byte_to_unicode().items()}


def _spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every pair whose concatenation is a token, best score first.

    SentencePiece BPE (and llama.cpp) merges the adjacent pair whose joined text is the
    vocab entry with the highest score; as ranked merges that is this list.
    """
    ids = set(tokens)
    ranked = [(-scores[i], i, cut, text[:cut], text[cut:])
              for i, text in enumerate(tokens) for cut in range(1, len(text))
              if text[:cut] in ids and text[cut:] in ids]
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _bpe_merges(lines: list[str], ids: dict[str, int]) -> list[tuple[str, str]]:
    pairs = []
    for line in lines:
        cut = line.find(" ", 1)  # as llama.cpp: the first space after the first character
        left, right = line[:cut], line[cut + 1:]
        # `tokenizers` rejects a merge whose parts or result are not tokens; such a merge
        # could only build a piece that llama.cpp then spells out byte by byte
        if cut > 0 and left in ids and right in ids and left + right in ids:
            pairs.append((left, right))
    return pairs


def _spm_pipeline(vocab: GGUFVocab, ids: dict[str, int]) -> HFTokenizer:
    unk = vocab.tokens[vocab.unk_id] if vocab.unk_id is not None else None
    hf = HFTokenizer(models.BPE(ids, _spm_merges(vocab.tokens, vocab.scores), unk_token=unk,
                                byte_fallback=True))
    # llama.cpp prefixes a space to every text fragment that starts the input or follows a
    # cut-out token; the normalizer runs once per such fragment, so Prepend does the same
    prefix = [normalizers.Prepend(SPACE_MARK)] if vocab.add_space_prefix else []
    hf.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", SPACE_MARK)])
    return hf


def _bpe_pipeline(vocab: GGUFVocab, ids: dict[str, int]) -> HFTokenizer:
    spec = vocab.pre
    hf = HFTokenizer(models.BPE(ids, _bpe_merges(vocab.merges, ids), ignore_merges=spec.ignore_merges,
                                byte_fallback=not spec.byte_level))
    # llama.cpp applies the regexes in turn, each splitting the pieces of the one before
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in spec.regexes]
    if spec.byte_level:
        splits.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence(splits)
    if spec.escape_whitespace:
        hf.normalizer = normalizers.Replace(" ", SPACE_MARK)
    return hf


def build_hf_tokenizer(vocab: GGUFVocab) -> HFTokenizer:
    """The `tokenizers` pipeline that encodes like llama.cpp for this vocabulary."""
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    hf = _spm_pipeline(vocab, ids) if vocab.is_spm else _bpe_pipeline(vocab, ids)

    def added(text: str, special: bool) -> AddedToken:
        rstrip = vocab.rstrip_special and text not in _PHI3_NO_RSTRIP
        return AddedToken(text, special=special, normalized=False, rstrip=rstrip)

    kinds = list(zip(vocab.tokens, vocab.types))
    hf.add_tokens([added(t, False) for t, kind in kinds if kind == TokenType.USER_DEFINED])
    hf.add_special_tokens([added(t, True) for t, kind in kinds if kind in _SPECIAL_TYPES])
    return hf


class Tokenizer:
    """Encode/decode with llama.cpp's results; ids are the GGUF vocabulary's ids."""

    def __init__(self, vocab: GGUFVocab):
        self.vocab = vocab
        self._hf = build_hf_tokenizer(vocab)
        self._lock = threading.Lock()  # encode_special_tokens is state of the shared pipeline
        self._pieces = [self._piece(text, kind) for text, kind in zip(vocab.tokens, vocab.types)]
        # No token stands for more characters than its piece has bytes: a text longer than
        # this times n tokens has more than n tokens (a bound that needs no tokenizing).
        self.max_chars_per_token = max(map(len, self._pieces))

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Read the tokenizer of a GGUF file (a full model or a vocab-only file)."""
        return cls.from_reader(gguf.GGUFReader(str(path)))

    @classmethod
    def from_reader(cls, reader: gguf.GGUFReader) -> Tokenizer:
        return cls(read_vocab(reader))

    def _piece(self, text: str, kind: TokenType) -> bytes:
        """llama.cpp's token_to_piece(special=True) before any leading-space strip."""
        if kind in _SPECIAL_TYPES or kind == TokenType.USER_DEFINED:
            return text.encode()
        if kind == TokenType.BYTE:
            return bytes([int(text[3:5], 16)])  # "<0xAB>"
        if kind != TokenType.NORMAL:
            return b""
        if self.vocab.is_spm or self.vocab.pre.escape_whitespace:
            return text.replace(SPACE_MARK, " ").encode()
        try:
            return text.translate(_BYTE_ALPHABET).encode("latin-1")
        except UnicodeEncodeError:  # a character outside the byte alphabet stands for itself
            return b"".join(c.translate(_BYTE_ALPHABET).encode("latin-1")
                            if ord(c) in _BYTE_ALPHABET else c.encode() for c in text)

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
        return self.vocab.eog_ids

    @property
    def vocab_size(self) -> int:
        return len(self.vocab.tokens)

    @property
    def add_bos(self) -> bool:
        return self.vocab.add_bos

    def token_text(self, token_id: int) -> str:
        """The token as the vocabulary spells it (e.g. 'ĠHello', '▁Hello', '<|im_end|>')."""
        return self.vocab.tokens[token_id]

    @property
    def special_texts(self) -> list[str]:
        """The spellings that parse_special turns into control (or unknown) tokens."""
        return [t for t, kind in zip(self.vocab.tokens, self.vocab.types) if kind in _SPECIAL_TYPES]

    def is_special(self, token_id: int) -> bool:
        """Control or unknown: rendered only on request, parsed only with parse_special."""
        return self.vocab.types[token_id] in _SPECIAL_TYPES

    # -- encode / decode -------------------------------------------------------------
    def encode(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        """Token ids of `text`. add_special adds BOS (and EOS) where the model asks for them;
        parse_special lets control-token text such as '<|im_start|>' become that token."""
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
        if skip_special and self.is_special(token_id):
            return b""
        return self._pieces[token_id]

    def decode_token(self, token_id: int) -> str:
        return self._pieces[token_id].decode("utf-8", errors="replace")

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """Text of `ids` as llama.cpp's detokenize gives it, without its optional clean-up
        of spaces before punctuation: with a SentencePiece space prefix the first token's
        leading space is dropped (unless a BOS was skipped, as in llama.cpp)."""
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
    """Turns generated token ids into text deltas, holding back partial UTF-8 characters.

    Pieces are llama.cpp's token_to_piece, as its server streams them: a SentencePiece
    token's leading space is kept, since generated text continues the prompt.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text this token completes ('' while a character is still incomplete)."""
        return self._utf8.decode(self.tokenizer.token_bytes(token_id, self.skip_special))

    def flush(self) -> str:
        """What is left at the end; an incomplete character becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)
