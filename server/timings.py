"""What `moestream generate` prints on stderr when it ends, in llama.cpp's terms: load time,
prompt evaluation (the time to the first token) and decode, each with tokens per second."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationTimings:
    load_s: float  # reading the file, placing the weights, allocating the KV cache
    prompt_tokens: int
    prompt_s: float  # from the request to the first generated token
    decode_tokens: int  # the generated tokens after the first
    decode_s: float

    def report(self) -> str:
        def rate(label: str, n: int, seconds: float, unit: str) -> str:
            ms = 1000 * seconds
            per_token = f"{ms / n:8.2f} ms per token, {n / seconds:8.2f} tokens per second" if n and seconds > 0 \
                else "no tokens"
            return f"moestream: {label:>16} = {ms:10.2f} ms / {n:5d} {unit} ({per_token})"

        total_s = self.load_s + self.prompt_s + self.decode_s
        return "\n".join([
            f"moestream: {'load time':>16} = {1000 * self.load_s:10.2f} ms",
            rate("prompt eval time", self.prompt_tokens, self.prompt_s, "tokens"),
            rate("decode time", self.decode_tokens, self.decode_s, "tokens"),
            f"moestream: {'total time':>16} = {1000 * total_s:10.2f} ms",
        ])
