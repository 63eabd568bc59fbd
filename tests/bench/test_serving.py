"""bench/serving.py against an in-process OpenAI-shaped server (httpx.MockTransport) whose
token counts and delays are known."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest

from bench.serving import make_prompts, percentile, run_load, summarize

DELAY_S = 0.25


def n_tokens(prompt: str) -> int:
    return len(prompt.split()) % 5 + 2


def sse(*events: dict) -> bytes:
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, choices: bool = True) -> dict:
    body = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m", "usage": usage,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else []}
    return body


async def handler(request: httpx.Request) -> httpx.Response:
    if request.url.path.endswith("/models"):
        return httpx.Response(200, json={"object": "list", "data": [
            {"id": "m", "object": "model", "created": 0, "owned_by": "test"}]})
    body = json.loads(request.content)
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    n = n_tokens(body["messages"][0]["content"])
    await asyncio.sleep(DELAY_S)  # the "prefill": every request's TTFT is at least this
    events = [chunk({"role": "assistant"}), *[chunk({"content": f"t{i} "}) for i in range(n)],
              chunk({}, finish="length"),
              chunk({}, usage={"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}, choices=False)]
    return httpx.Response(200, content=sse(*events), headers={"content-type": "text/event-stream"})


def test_run_load_counts_tokens_and_runs_clients_concurrently() -> None:
    prompts = make_prompts(8, 13, seed=0)
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    results, wall = asyncio.run(run_load("http://test", prompts, 4, max_tokens=16, extra_body={}, http_client=client))
    summary = summarize("http://test", results, wall, 4)
    assert summary.n_requests == 8
    assert summary.completion_tokens == sum(n_tokens(p) for p in prompts)
    assert summary.ttft_p50_s >= DELAY_S
    # 8 requests, 4 at a time: two rounds of the delay, far below 8 sequential ones
    assert 2 * DELAY_S <= wall < 5 * DELAY_S
    assert summary.tokens_per_s == pytest.approx(summary.completion_tokens / wall)


def test_make_prompts_differ_and_repeat_with_the_seed() -> None:
    prompts = make_prompts(5, 20, seed=3)
    assert len(set(prompts)) == 5 and all(len(p.split()) == 20 for p in prompts)
    assert prompts == make_prompts(5, 20, seed=3)


@pytest.mark.parametrize("q", [0, 10, 50, 90, 99, 100])
def test_percentile_matches_numpy(q: float) -> None:
    values = list(np.random.default_rng(0).exponential(size=37))
    assert percentile(values, q) == pytest.approx(np.percentile(values, q))
