"""StopMatcher against a brute-force reference, over random texts cut into random tokens."""

import random

import pytest

from moestream.server.stops import StopMatcher


def reference_output(text: str, stops: list[str]) -> tuple[str, bool]:
    """The whole output, reading one character at a time: cut before the first stop string
    to complete (the longest one when several complete on the same character)."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if s and text[:end].endswith(s)]
        if done:
            return text[: end - max(map(len, done))], True
    return text, False


def reference_safe_prefix(received: str, stops: list[str]) -> str:
    """What may be emitted after `received` (no stop in it yet): everything before the first
    position from which the rest could still grow into some stop string."""
    for start in range(len(received)):
        rest = received[start:]
        if any(s and s.startswith(rest) for s in stops):
            return received[:start]
    return received


def random_pieces(rng: random.Random, text: str) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=rng.randint(0, len(text) - 1))) if len(text) > 1 else []
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("seed", range(300))
def test_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "ab c"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
    matcher = StopMatcher(stops)
    emitted, received = "", ""
    for piece in random_pieces(rng, text):
        emitted += matcher.push(piece)
        received += piece
        if matcher.is_stopped:
            break
        assert emitted == reference_safe_prefix(received, stops), "held back too much or too little"
    if not matcher.is_stopped:
        emitted += matcher.flush()
    assert (emitted, matcher.is_stopped) == reference_output(text, stops)


def test_stop_split_across_tokens_is_never_emitted() -> None:
    matcher = StopMatcher(["</end>"])
    assert matcher.push("hello </") == "hello "
    assert matcher.push("en") == ""
    assert matcher.push("d> more") == ""
    assert matcher.is_stopped


def test_first_completed_stop_wins() -> None:
    matcher = StopMatcher(["abcd", "bc"])
    assert matcher.push("abcd") == "a"  # "bc" completes before "abcd" does
    assert matcher.is_stopped


def test_false_start_is_released() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.push("ST") == ""
    assert matcher.push("OP!") == ""  # "STOP" completes: nothing of it is emitted
    assert matcher.is_stopped
    matcher = StopMatcher(["STOP"])
    assert matcher.push("ST") == ""
    assert matcher.push("ART") == "START"
    assert not matcher.is_stopped


def test_held_text_flushed_at_end() -> None:
    matcher = StopMatcher(["\n\n"])
    assert matcher.push("line\n") == "line"
    assert matcher.flush() == "\n"


def test_no_stops_passes_through() -> None:
    matcher = StopMatcher(["", ""])
    assert matcher.push("anything") == "anything"
    assert not matcher.is_stopped
