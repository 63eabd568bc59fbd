"""How llama.cpp pre-tokenizes text for each `tokenizer.ggml.pre` type of a BPE vocabulary.

The regexes are the ones llama.cpp applies in src/llama-vocab.cpp (llm_tokenizer_bpe), in
the same order: each one splits every piece left by the previous one, keeping both the
matches and the text between them. Where llama.cpp rewrites a tokenizer.json regex (e.g.
`(?i:'s|...)` spelled out case by case), its rewrite is kept so that the splits agree with it.
"""

from dataclasses import dataclass

from moestream.kernels.errors import MoestreamError

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
    + r"|\s+(?!\S)|\s+"
)
_JAIS2 = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    + r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)"
    + r"|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}"
)
_CJK_KANA = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
_ASCII_PUNCT_WORD = r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"""
_DEEPSEEK3 = (
    _ASCII_PUNCT_WORD
    + r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPARK = (
    _ASCII_PUNCT_WORD
    + r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+"
)
# Non-ASCII ranges are written as escapes: some of these code points (e.g. U+1FD3, U+2126)
# have canonical equivalents that an editor's Unicode normalization would silently swap in.
_DEEPSEEK_LLM_LETTERS = (
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293"
    "\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c"
    "\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5"
    "\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59"
    "\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc"
    "\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107"
    "\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee"
    "\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e"
    "\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f"
    "\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2"
    "\U000118a0-\U000118df\U0001e900-\U0001e943]+"
)
_DEEPSEEK_LLM_PUNCT = "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+"
_CJK_HANGUL = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_CASED_WORDS = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    + _CONTRACTIONS
    + r"?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    + _CONTRACTIONS
    + r"?"
)
# llama.cpp spells "upper case" / "lower case" letters with lookaheads; kept for parity.
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + _CONTRACTIONS + "?"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + _CONTRACTIONS + "?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GRANITE_EMB_MULTI = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))*((?=[\p{L}\p{M}])([^A-Z]))+"
    + _CONTRACTIONS + "?"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))+((?=[\p{L}\p{M}])([^A-Z]))*"
    + _CONTRACTIONS + "?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PORO = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"
_LINES = r"[^\n]+|[\n]+"


@dataclass(frozen=True)
class PreTokenizerSpec:
    """What llama.cpp does for one pre-tokenizer type before and around the BPE merges."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a whole piece found in the vocab is one token
    force_add_bos: bool = False  # add_bos defaults to true (metadata may still override)
    byte_level: bool = True  # GPT-2 byte-to-unicode alphabet
    escape_whitespace: bool = False  # spaces become U+2581 before the merges (SPM-style BPE)


_DEFAULT = PreTokenizerSpec(
    (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")
)
_GPT2_SPEC = PreTokenizerSpec((_GPT2,))
_STARCODER = PreTokenizerSpec((r"\p{N}", _GPT2))
_LLAMA3_SPEC = PreTokenizerSpec((_LLAMA3,), ignore_merges=True, force_add_bos=True)
_QWEN2_SPEC = PreTokenizerSpec((_QWEN2,))
_DEEPSEEK3_SPEC = PreTokenizerSpec((r"\p{N}{1,3}", _CJK_KANA, _DEEPSEEK3))
_SPM_STYLE = PreTokenizerSpec((_LINES,), byte_level=False, escape_whitespace=True)


def _names(spec: PreTokenizerSpec, *names: str) -> dict[str, PreTokenizerSpec]:
    return {name: spec for name in names}


PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    **_names(_DEFAULT, "default"),
    **_names(
        _LLAMA3_SPEC,
        "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
        "lfm2", "jina-v5-nano",
    ),
    **_names(PreTokenizerSpec((_LLAMA3,)), "dbrx", "smaug-bpe"),
    **_names(PreTokenizerSpec((_JAIS2,)), "jais-2"),
    **_names(
        PreTokenizerSpec(
            (r"[\r\n]", _DEEPSEEK_LLM_LETTERS, _DEEPSEEK_LLM_PUNCT, r"\s+$",
             _CJK_HANGUL, r"\p{N}+")
        ),
        "deepseek-llm",
    ),
    **_names(
        PreTokenizerSpec(
            (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_HANGUL, r"\p{N}")
        ),
        "deepseek-coder",
    ),
    **_names(_DEEPSEEK3_SPEC, "deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"),
    **_names(PreTokenizerSpec((r"\p{N}{1,3}", _CJK_KANA, _SPARK, r"\p{N}")), "spark2_5"),
    **_names(
        PreTokenizerSpec(
            (
                "[\uac00-\ud7a3\u3131-\u318e]+|[\uff01\u2026\u201c\u201d\u2018\u2019\u2014\uff1a\uff1b\uff0c"
                "\u3001-\u303f\ufe30-\ufe4f]+|[\u3105-\u312f]+|" + _CJK_KANA,
                _CASED_WORDS + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            ),
            ignore_merges=True,
        ),
        "youtu",
    ),
    **_names(
        PreTokenizerSpec((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]")), "falcon"
    ),
    **_names(
        _GPT2_SPEC,
        "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
        "a.x-4.0", "mellum", "modern-bert", "exaone4", "jina-v1-en", "jina-v2-code",
        "roberta-bpe", "mpt", "olmo", "jais", "trillion", "granite-docling",
    ),
    **_names(
        _STARCODER,
        "starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b",
        "mellum2",
    ),
    **_names(
        _QWEN2_SPEC,
        "qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan",
        "solar-open", "grok-2",
    ),
    **_names(PreTokenizerSpec((_QWEN35,)), "qwen35"),
    **_names(PreTokenizerSpec((_PORO,)), "poro-chat", "bloom", "gpt3-finnish"),
    **_names(PreTokenizerSpec((_PORO, r"\p{N}")), "viking"),
    **_names(PreTokenizerSpec((_LLAMA3,)), "chatglm-bpe"),
    **_names(PreTokenizerSpec((_LLAMA3,), ignore_merges=True), "glm4", "glm5"),
    **_names(
        PreTokenizerSpec((_TEKKEN,), ignore_merges=True, force_add_bos=True), "tekken"
    ),
    **_names(
        PreTokenizerSpec(
            (
                r"<sentinel:[0-9]+>",
                r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
                r"([\t\n]|    |  )",
                r"\p{N}",
                r"[\p{P}!-/:-@\[-`{-~]",
                _GPT2,
            ),
            force_add_bos=True,
        ),
        "chameleon",
    ),
    **_names(PreTokenizerSpec((_GPT4O,)), "gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"),
    **_names(
        PreTokenizerSpec((_GRANITE_EMB_MULTI,), ignore_merges=True), "granite-embed-multi-97m"
    ),
    **_names(
        PreTokenizerSpec(
            (
                r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
            )
        ),
        "bailingmoe", "bailingmoe2", "llada-moe",
    ),
    **_names(
        PreTokenizerSpec(
            (
                _CONTRACTIONS
                + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+"
                + r"|\s+(?!\S)|\s+",
            )
        ),
        "seed-coder",
    ),
    **_names(
        PreTokenizerSpec(
            (
                r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+",
            )
        ),
        "ufakzeka",
    ),
    **_names(PreTokenizerSpec((_LINES, _QWEN2)), "laguna"),
    **_names(
        PreTokenizerSpec(
            (
                _CONTRACTIONS
                + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
                + r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+",
            )
        ),
        "exaone-moe",
    ),
    **_names(_SPM_STYLE, "gemma4", "granite-embed-multi-311m", "sarvam-moe"),
    **_names(
        PreTokenizerSpec(
            (
                r"\p{N}{1,3}",
                _CONTRACTIONS
                + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                + r"|\s+(?!\S)|\s+",
            ),
            ignore_merges=True,
        ),
        "minicpm5",
    ),
}


def pre_tokenizer_spec(name: str) -> PreTokenizerSpec:
    """The spec for a `tokenizer.ggml.pre` value; unknown types are an error, never a guess."""
    spec = PRE_TOKENIZERS.get(name)
    if spec is None:
        raise MoestreamError(
            f"unsupported pre-tokenizer type tokenizer.ggml.pre={name!r}; supported: "
            f"{', '.join(sorted(PRE_TOKENIZERS))}. Use a GGUF converted for one of these."
        )
    return spec
