"""Next-token choice per sequence: grammar masks, penalties, temperature, top-k, top-p, seeded draws."""

from __future__ import annotations

import torch

from moestream.engine.constraints import allowed_tokens
from moestream.engine.sequence import Sequence, TokenLogprob


def apply_penalties(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    p = seq.params
    if not seq.output_ids or (p.presence_penalty == 0 and p.frequency_penalty == 0):
        return logits
    counts = torch.bincount(torch.tensor(seq.output_ids), minlength=logits.shape[-1]).to(logits)
    return logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(logits)


def apply_logit_bias(logits: torch.Tensor, bias: tuple[tuple[int, float], ...]) -> torch.Tensor:
    """Add each token's bias to its logit (after the grammar mask: a bias never unmasks)."""
    ids, values = zip(*bias)
    return logits.index_add(0, torch.tensor(ids, device=logits.device),
                            torch.tensor(values, dtype=logits.dtype, device=logits.device))


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p
        unsorted_drop = torch.empty_like(drop).scatter_(0, order, drop)
        logits = logits.masked_fill(unsorted_drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[tuple[int, TokenLogprob | None]]:
    """logits: [len(seqs), vocab] on any device. Returns the chosen token (and logprobs) per sequence.

    Sampling runs on the host: each sequence's seeded generator is a CPU one (a draw on a
    device tensor needs a generator of that device, and CUDA draws differ from CPU draws), so
    the sampled rows cross once per step, one small copy, and a seed gives the same tokens
    whatever device computed the logits.
    """
    logits = logits.to("cpu", torch.float32)
    masked = grammar_masked(logits, seqs)
    chosen = []
    for i, (row, seq) in enumerate(zip(logits, seqs)):
        p = seq.params
        scores = masked[i] if masked is not None else row
        if p.logit_bias:
            scores = apply_logit_bias(scores, p.logit_bias)
        scores = apply_penalties(scores, seq)
        if p.greedy:
            token = int(scores.argmax())
        else:
            scores = filter_top_k_top_p(scores / p.temperature, p.top_k, p.top_p)
            probs = scores.softmax(-1)
            token = int(torch.multinomial(probs, 1, generator=seq.generator))
        chosen.append((token, _logprobs(row, token, p.logprobs)))
    return chosen


def grammar_masked(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor | None:
    """The logits with each constrained row's disallowed tokens at -inf (None: no grammar)."""
    rows = [i for i, seq in enumerate(seqs) if seq.constraint is not None]
    if not rows:
        return None
    allowed = allowed_tokens([seqs[i].constraint for i in rows], logits.shape[-1])
    masked = logits.clone()
    masked[rows] = masked[rows].masked_fill(~allowed, float("-inf"))
    return masked


def _logprobs(row: torch.Tensor, token: int, n_top: int | None) -> TokenLogprob | None:
    if n_top is None:
        return None
    logprobs = row.log_softmax(-1)
    top = []
    if n_top > 0:
        values, ids = logprobs.topk(n_top)
        top = [(int(i), float(v)) for i, v in zip(ids, values)]
    return TokenLogprob(token, float(logprobs[token]), top)
