"""Stop strings over a stream of text deltas: never emit a stop string, even one split
across tokens.

Text that could still be the start of a stop string is held back until the next delta
shows whether it is; a match ends the stream with the text before the stop string.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.is_stopped = False

    def push(self, text: str) -> str:
        """The text that is now safe to emit; sets `is_stopped` when a stop string appears."""
        assert not self.is_stopped, "push after a stop string matched"
        buffer = self.held + text
        # The stop that completes first wins, as if the text had come one character at a
        # time; of two completing at once, the longer (earlier-starting) one.
        found = [(i + len(s), i) for s, i in ((s, buffer.find(s)) for s in self.stops) if i >= 0]
        if found:
            self.held, self.is_stopped = "", True
            return buffer[: min(found)[1]]
        keep = self._partial_suffix(buffer)
        self.held = buffer[len(buffer) - keep:]
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """The held-back text, at the end of a stream that did not stop on a string."""
        text, self.held = self.held, ""
        return text

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that begins some stop string."""
        longest = min(len(buffer), max((len(s) - 1 for s in self.stops), default=0))
        for n in range(longest, 0, -1):
            tail = buffer[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
