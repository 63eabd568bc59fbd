"""One forward of a few tokens before a model is declared ready, which must be finite.

The header checks (file_check.py) cannot see the weights themselves: a block whose scale
decodes to NaN or inf passes them and would poison every request. The commands that load
a model (serve, generate, bench, perplexity) call this once after loading, so such a file
fails at start with one line instead of in every completion.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moestream.kernels.errors import MoestreamError

if TYPE_CHECKING:
    from moestream.engine.engine import Engine

PROBE_TEXT = "The capital of France is"
MAX_PROBE_TOKENS = 8


def probe_token_ids(engine: Engine) -> list[int]:
    """A few tokens of plain text as the model's tokenizer spells them (BOS first if the
    model wants one); token 0 where the text encodes to nothing."""
    ids = engine.tokenizer.encode(PROBE_TEXT, add_special=True)[:MAX_PROBE_TOKENS] or [0]
    return ids[: engine.max_model_len]


def check_startup_forward(engine: Engine) -> None:
    """Raise a MoestreamError if the probe's logits hold a NaN or an inf, or are the same
    for every token (the int8 CPU kernels turn NaN activations into zeros)."""
    ids = probe_token_ids(engine)
    logits = engine.score(ids)  # [len(ids), vocab] float32
    is_finite = torch.isfinite(logits).all(dim=-1)
    is_flat = logits.amax(dim=-1) == logits.amin(dim=-1)
    is_bad = ~is_finite | is_flat
    if bool(is_bad.any()):
        position = int(is_bad.nonzero()[0, 0])
        what = "NaN or inf logits" if not is_finite[position] else "the same logit for every token"
        raise MoestreamError(
            f"{engine.file.path}: the start-up forward of {len(ids)} tokens gave {what} "
            f"(first at position {position}); the weights are corrupt: download the file again")
