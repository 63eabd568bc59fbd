"""Serving benchmark: N concurrent streaming clients against OpenAI-compatible servers.

    python bench/serving.py --url http://127.0.0.1:8000 [--llama-url http://127.0.0.1:8001] \
        --clients 4 --requests 32 --max-tokens 128

Start `moestream serve` (and optionally `python -m llama_cpp.server --model ...`) first.
Each request is a streamed chat completion with usage; a request's TTFT is the time to its
first content delta, its tokens are the server's usage.completion_tokens. Reported per
server: aggregate generated tokens/s over the wall time, requests/s, TTFT p50/p90/p99 and
the mean per-request decode rate. The same prompts go to both servers, one server at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import httpx
import openai

_WORDS = ("the river ran past a mill where the old miller kept his grain and his counsel "
          "through long winters while the town argued about bridges taxes and the weather").split()


@dataclass(frozen=True)
class RequestResult:
    ttft_s: float
    latency_s: float
    completion_tokens: int


@dataclass(frozen=True)
class LoadSummary:
    url: str
    n_requests: int
    n_clients: int
    wall_s: float
    completion_tokens: int
    tokens_per_s: float
    requests_per_s: float
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    mean_decode_tok_s: float


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), q in [0, 100]."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def make_prompts(n: int, n_words: int, seed: int) -> list[str]:
    """Distinct prompts (so no server can reuse a cached prefix across requests)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(n_words)) for _ in range(n)]


async def one_request(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int,
                      extra_body: dict) -> RequestResult:
    start = time.perf_counter()
    first = None
    deltas = 0
    usage_tokens = None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=0.0, stream=True, stream_options={"include_usage": True}, extra_body=extra_body)
    async for chunk in stream:
        if chunk.usage is not None:
            usage_tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            deltas += 1
            first = first or time.perf_counter()
    end = time.perf_counter()
    # a server that sends no usage chunk: count content deltas (one token each on ours)
    tokens = usage_tokens if usage_tokens is not None else deltas
    return RequestResult((first or end) - start, end - start, tokens)


async def run_load(url: str, prompts: list[str], n_clients: int, max_tokens: int, extra_body: dict,
                   http_client: httpx.AsyncClient | None = None) -> tuple[list[RequestResult], float]:
    """Send every prompt, at most `n_clients` at a time; (results, wall seconds)."""
    client = openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key="none", http_client=http_client,
                                max_retries=0, timeout=3600)
    model = (await client.models.list()).data[0].id
    queue = list(reversed(prompts))
    results: list[RequestResult] = []

    async def worker() -> None:
        while queue:
            results.append(await one_request(client, model, queue.pop(), max_tokens, extra_body))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(n_clients)))
    return results, time.perf_counter() - start


def summarize(url: str, results: list[RequestResult], wall_s: float, n_clients: int) -> LoadSummary:
    ttfts = [r.ttft_s for r in results]
    decode = [(r.completion_tokens - 1) / (r.latency_s - r.ttft_s)
              for r in results if r.completion_tokens > 1 and r.latency_s > r.ttft_s]
    tokens = sum(r.completion_tokens for r in results)
    return LoadSummary(
        url=url, n_requests=len(results), n_clients=n_clients, wall_s=wall_s, completion_tokens=tokens,
        tokens_per_s=tokens / wall_s, requests_per_s=len(results) / wall_s,
        ttft_p50_s=percentile(ttfts, 50), ttft_p90_s=percentile(ttfts, 90), ttft_p99_s=percentile(ttfts, 99),
        mean_decode_tok_s=statistics.fmean(decode) if decode else 0.0)


_ROWS = [("tokens/s", "tokens_per_s", "{:.2f}"), ("requests/s", "requests_per_s", "{:.3f}"),
         ("TTFT p50 s", "ttft_p50_s", "{:.3f}"), ("TTFT p90 s", "ttft_p90_s", "{:.3f}"),
         ("TTFT p99 s", "ttft_p99_s", "{:.3f}"), ("decode tok/s/req", "mean_decode_tok_s", "{:.2f}"),
         ("gen tokens", "completion_tokens", "{:d}")]


def format_table(summaries: dict[str, LoadSummary]) -> str:
    names = list(summaries)
    lines = [f"{'metric':<18}" + "".join(f"{n:>14}" for n in names)]
    for label, key, fmt in _ROWS:
        lines.append(f"{label:<18}" + "".join(f"{fmt.format(getattr(summaries[n], key)):>14}" for n in names))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="base URL of a running `moestream serve`")
    p.add_argument("--llama-url", default=None, help="base URL of a llama-cpp-python server to compare")
    p.add_argument("--clients", type=int, default=4, help="concurrent streaming clients")
    p.add_argument("--requests", type=int, default=16, help="requests per server")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-words", type=int, default=200)
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (servers that accept it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompts = make_prompts(args.requests, args.prompt_words, args.seed)
    extra = {"ignore_eos": True} if args.ignore_eos else {}
    urls = {"moestream": args.url, **({"llama_cpp": args.llama_url} if args.llama_url else {})}
    summaries = {}
    for name, url in urls.items():
        results, wall = asyncio.run(run_load(url, prompts, args.clients, args.max_tokens, extra))
        summaries[name] = summarize(url, results, wall, args.clients)
    if args.json:
        print(json.dumps({name: asdict(s) for name, s in summaries.items()}))
    else:
        print(f"{args.requests} requests, {args.clients} clients, max_tokens {args.max_tokens}")
        print(format_table(summaries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
