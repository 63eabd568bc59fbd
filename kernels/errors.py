"""Project exceptions for errors a user can cause.

They live in the lowest layer so every layer can raise them; the CLI turns them into one
line and exit code 2, the server into an OpenAI-shaped error with a 4xx status.
"""


class MoestreamError(Exception):
    """An error the user can fix; the message says what to do."""


class UnsupportedQuantType(MoestreamError):
    """A tensor uses a GGML quantization type moestream cannot decode."""
