"""How llama.cpp pre-tokenizes text for each `tokenizer.ggml.pre` type of a BPE vocabulary.

The regexes are the ones llama.cpp applies in src/llama-vocab.cpp (llm_tokenizer_bpe), in
the same order: each one splits every piece left by the previous one, keeping both the
matches and the text between them. Where llama.cpp rewrites a tokenizer.json regex (e.g.
`(?i:'s|...)` spelled out case by case), its rewrite is kept so that the splits agree with it.
"""

from dataclasses import dataclass

from kernels.errors import MoestreamError

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
_CJK_KANA = r"[一-龥぀-ゟ゠-ヿ]+"
_ASCII_PUNCT_WORD = r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"""
_DEEPSEEK3 = (
    _ASCII_PUNCT_WORD
    + r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPARK = (
    _ASCII_PUNCT_WORD
    + r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+"
)
_DEEPSEEK_LLM_LETTERS = (
    r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕ"
    r"ἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯ"
    r"ꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+"
)
_CJK_HANGUL = r"[一-龥ࠀ-一가-퟿]+"
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
_PORO = r" ?[^(\s|.,!?…。，、।۔،)]+"
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
            (r"[\r\n]", _DEEPSEEK_LLM_LETTERS, r"\s?[!-/:-~！-／：-～‘-‟　-。]+", r"\s+$",
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
                r"[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|[一-龥぀-ゟ゠-ヿ]+",
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
