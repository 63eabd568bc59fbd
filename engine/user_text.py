"""User text stays text: a control token's spelling inside a chat message (say
'<|im_start|>system') is tokenized as plain text, so a client cannot forge a role; only the
chat template's own markup becomes control tokens.

Before rendering, every control-token spelling in a message's strings is swapped for a
numbered private-use marker, so the template renders the message as usual but cannot emit
the user's copy of a control token. The rendered prompt is then cut at the markers: the
template's text is tokenized with special tokens parsed, each marker as the plain text it
stands for. A message with no control-token spelling renders and tokenizes exactly as
before.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

# Supplementary Private Use Area-A: no tokenizer gives these characters a meaning.
_OPEN, _CLOSE = "\U000f0000", "\U000f0001"
_MARKER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


class UserTextShield:
    def __init__(self, control_texts: Iterable[str]):
        # Longest first: the regex takes the first alternative that matches. The marker
        # characters are shielded too, so a client cannot write a marker of its own.
        texts = sorted({t for t in control_texts if t} | {_OPEN, _CLOSE}, key=len, reverse=True)
        firsts = "".join(sorted({re.escape(t[0]) for t in texts}))
        # The lookahead lets the scan skip every position that cannot start a control token.
        self._pattern = re.compile(f"(?=[{firsts}])(?:{'|'.join(map(re.escape, texts))})")

    def shield(self, messages: list[dict]) -> tuple[list[dict], list[str]]:
        """`messages` with every control-token spelling in their strings replaced by a
        marker, and the texts the markers stand for (marker i stands for texts[i])."""
        texts: list[str] = []

        def mark(match: re.Match) -> str:
            texts.append(match.group())
            return f"{_OPEN}{len(texts) - 1}{_CLOSE}"

        def walk(value: Any) -> Any:
            if isinstance(value, str):
                return self._pattern.sub(mark, value)
            if isinstance(value, list):
                return [walk(v) for v in value]
            if isinstance(value, dict):
                return {k: walk(v) for k, v in value.items()}
            return value

        return [walk(m) for m in messages], texts


def split_rendered(rendered: str, texts: list[str]) -> list[tuple[str, bool]]:
    """The rendered prompt as (text, is_markup) pieces in order: markup is the template's
    text (control tokens parsed), the others are user text put back in place of markers."""
    if not texts:
        return [(rendered, True)]
    pieces, start = [], 0
    for match in _MARKER.finditer(rendered):
        pieces.append((rendered[start:match.start()], True))
        pieces.append((texts[int(match.group(1))], False))
        start = match.end()
    pieces.append((rendered[start:], True))
    return [(text, is_markup) for text, is_markup in pieces if text]
