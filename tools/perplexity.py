"""`moestream perplexity`: llama.cpp's perplexity method, on our engine and optionally llama.cpp.

The method (llama.cpp tools/perplexity, `perplexity()`): tokenize the whole text (a BOS first
when the model adds one), cut it into chunks of n_ctx tokens, evaluate each chunk as a fresh
sequence whose first token is replaced by BOS when the model adds one, and score only the
second half: the logits at positions n_ctx/2 .. n_ctx-2 predict the next token.
ppl = exp(mean NLL) over every scored token; the +/- is llama.cpp's standard error.
With --vs-llama-cpp the same chunks (our token ids) go through llama-cpp-python.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from moestream.kernels.errors import MoestreamError

Scorer = Callable[[list[int]], torch.Tensor]  # token ids -> logits [T, V] for every position


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    ppl_stderr: float
    mean_nll: float
    n_scored: int  # tokens whose NLL went into the mean
    n_chunks: int
    n_ctx: int


def make_chunks(token_ids: list[int], n_ctx: int, n_chunks: int | None, bos_id: int | None) -> list[list[int]]:
    """The chunks llama.cpp evaluates: consecutive n_ctx-token slices, first token -> BOS."""
    if n_ctx < 4:
        raise MoestreamError(f"--ctx must be at least 4 tokens, got {n_ctx}")
    if n_chunks is not None and n_chunks < 1:
        raise MoestreamError(f"--chunks must be at least 1, got {n_chunks}")
    if len(token_ids) < 2 * n_ctx:
        raise MoestreamError(f"the text tokenizes to {len(token_ids)} tokens; perplexity with --ctx {n_ctx} "
                             f"needs at least {2 * n_ctx}: use a longer text or a smaller --ctx")
    available = len(token_ids) // n_ctx
    count = available if n_chunks is None else min(n_chunks, available)
    chunks = [list(token_ids[i * n_ctx : (i + 1) * n_ctx]) for i in range(count)]
    if bos_id is not None:
        for chunk in chunks:
            chunk[0] = bos_id
    return chunks


def scored_nll(logits: torch.Tensor, chunk: list[int]) -> torch.Tensor:
    """NLL of each scored token of one chunk: logits rows n_ctx/2 .. n_ctx-2 against the next token."""
    first = len(chunk) // 2
    rows = logits[first : len(chunk) - 1].double()
    targets = torch.tensor(chunk[first + 1 :], dtype=torch.long)
    return -torch.log_softmax(rows, dim=-1).gather(1, targets[:, None])[:, 0]


def perplexity(score: Scorer, chunks: list[list[int]], progress: bool = True,
               desc: str = "perplexity") -> PerplexityResult:
    nlls = torch.cat([scored_nll(score(chunk), chunk) for chunk in tqdm(chunks, desc=desc, disable=not progress)])
    mean = float(nlls.mean())
    # llama.cpp: sqrt((E[nll^2] - E[nll]^2) / (n - 1)) on the mean NLL, times ppl for ppl's error
    variance = float((nlls**2).mean()) - mean**2
    stderr = math.sqrt(max(variance, 0.0) / (len(nlls) - 1)) if len(nlls) > 1 else 0.0
    ppl = math.exp(mean)
    return PerplexityResult(ppl, ppl * stderr, mean, len(nlls), len(chunks), len(chunks[0]))


# -- command line -------------------------------------------------------------------------
def add_perplexity_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", required=True, help="path of a .gguf model file")
    parser.add_argument("--text", required=True, help="plain-text file to score")
    parser.add_argument("--ctx", type=int, default=512, help="tokens per chunk (llama.cpp's -c)")
    parser.add_argument("--chunks", type=int, default=None, help="score only the first N chunks")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--vram-budget", default=None, help="device memory for the model, e.g. 4GiB")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (both engines)")
    parser.add_argument("--vs-llama-cpp", action="store_true",
                        help="also compute llama.cpp's perplexity on the same chunks")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def perplexity_main(args: argparse.Namespace) -> int:
    from moestream.engine import Engine
    from moestream.engine.startup_check import check_startup_forward

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine = Engine.from_gguf(args.model, device=device, vram_budget=args.vram_budget,
                              ctx_size=args.ctx, max_batch=1, max_batched_tokens=args.ctx)
    check_startup_forward(engine)
    tok = engine.tokenizer
    text = Path(args.text).read_text(encoding="utf-8")
    bos = tok.bos_id if tok.add_bos else None
    chunks = make_chunks(tok.encode(text, add_special=True), args.ctx, args.chunks, bos)
    results = {"moestream": perplexity(engine.score, chunks, desc="moestream")}
    del engine
    if args.vs_llama_cpp:
        from moestream.tools.llama_cpp_ref import llama_cpp_scorer

        with llama_cpp_scorer(args.model, args.ctx, args.threads, -1 if device == "cuda" else 0) as score:
            results["llama_cpp"] = perplexity(score, chunks, desc="llama.cpp")
    _report(results, args.json)
    return 0


def _report(results: dict[str, PerplexityResult], as_json: bool) -> None:
    if as_json:
        print(json.dumps({name: asdict(r) for name, r in results.items()}))
        return
    for name, r in results.items():
        print(f"{name:>10}: PPL = {r.ppl:.4f} +/- {r.ppl_stderr:.4f}  "
              f"({r.n_chunks} chunks of {r.n_ctx}, {r.n_scored} scored tokens)")
    if len(results) == 2:
        ours, theirs = results["moestream"].ppl, results["llama_cpp"].ppl
        print(f"     ratio: moestream / llama.cpp = {ours / theirs:.4f}")
