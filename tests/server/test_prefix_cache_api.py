"""The prefix cache through the API: usage.prompt_tokens_details.cached_tokens (chat,
completions, streamed usage, /v1/responses), the /metrics counters a hit rate is made of,
and --no-prefix-cache."""

import pytest

from tests.fixtures.models import get_fixture, sample_token_ids
from tests.server.conftest import MODEL_NAME, ServerProcess
from tests.server.test_api import wait_for_idle

BLOCK = 16  # the engine's default KV block size
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


def start(gguf, *extra: str) -> ServerProcess:
    return ServerProcess(["--model", str(gguf), "--served-model-name", MODEL_NAME, "--ctx-size", "512",
                          *extra]).start()


@pytest.fixture(scope="module")
def cached(olmoe_gguf):
    proc = start(olmoe_gguf)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def uncached(olmoe_gguf):
    proc = start(olmoe_gguf, "--no-prefix-cache")
    yield proc
    proc.stop()


def prompt_pair(seed: int) -> tuple[list[int], list[int]]:
    """Two prompts sharing 37 tokens: two full blocks (32 tokens) can be reused."""
    fixture = get_fixture("olmoe")
    shared = sample_token_ids(fixture, 37, seed=seed)
    return shared + sample_token_ids(fixture, 4, seed=seed + 1), shared + sample_token_ids(fixture, 9, seed=seed + 2)


def completion(server: ServerProcess, prompt: list[int], **kwargs):
    return server.client().completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=4, **GREEDY, **kwargs)


def test_completions_report_cached_tokens_and_the_metrics_count_them(cached):
    first, second = prompt_pair(60)
    before = wait_for_idle(cached)
    assert completion(cached, first).usage.prompt_tokens_details.cached_tokens == 0
    out = completion(cached, second)
    assert out.usage.prompt_tokens == len(second)
    assert out.usage.prompt_tokens_details.cached_tokens == 2 * BLOCK
    after = cached.metrics()

    def delta(name: str) -> float:
        return after[(f"moestream:{name}", ())] - before.get((f"moestream:{name}", ()), 0)

    assert delta("prefix_cache_queries_total") == len(first) + len(second)
    assert delta("prefix_cache_hits_total") == 2 * BLOCK
    assert delta("prompt_tokens_computed_total") == len(first) + len(second) - 2 * BLOCK
    assert delta("prompt_tokens_total") == len(first) + len(second), "the prompt counter counts cached tokens too"


def test_the_cache_changes_no_text(cached, uncached):
    first, second = prompt_pair(70)
    for server in (cached, uncached):
        completion(server, first)
    hit, miss = completion(cached, second), completion(uncached, second)
    assert hit.usage.prompt_tokens_details.cached_tokens == 2 * BLOCK
    assert miss.usage.prompt_tokens_details.cached_tokens == 0
    assert hit.choices[0].text == miss.choices[0].text


def test_a_multi_turn_chat_reports_its_cached_prefix_streamed_and_not(cached):
    client = cached.client()
    system = {"role": "system", "content": " ".join(f"rule {i}: answer briefly." for i in range(20))}
    turn1 = [system, {"role": "user", "content": "What is a mixture of experts?"}]
    reply = client.chat.completions.create(model=MODEL_NAME, messages=turn1, max_tokens=8, **GREEDY)
    assert reply.usage.prompt_tokens > 3 * BLOCK
    turn2 = turn1 + [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": "And a router?"}]
    again = client.chat.completions.create(model=MODEL_NAME, messages=turn2, max_tokens=4, **GREEDY)
    cached_tokens = again.usage.prompt_tokens_details.cached_tokens
    assert cached_tokens >= (reply.usage.prompt_tokens // BLOCK - 1) * BLOCK and cached_tokens % BLOCK == 0
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=turn2, max_tokens=4, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    usage = chunks[-1].usage
    assert usage.prompt_tokens == again.usage.prompt_tokens
    assert usage.prompt_tokens_details.cached_tokens == (usage.prompt_tokens - 1) // BLOCK * BLOCK


def test_responses_report_cached_input_tokens(cached):
    text = "A long shared instruction. " * 12
    client = cached.client()
    client.responses.create(model=MODEL_NAME, input=text + "First question?", max_output_tokens=4)
    out = client.responses.create(model=MODEL_NAME, input=text + "Second question?", max_output_tokens=4)
    assert out.usage.input_tokens_details.cached_tokens >= BLOCK


def test_no_prefix_cache_reports_nothing_cached(uncached):
    prompt = prompt_pair(80)[0]
    completion(uncached, prompt)
    assert completion(uncached, prompt).usage.prompt_tokens_details.cached_tokens == 0
    assert wait_for_idle(uncached)[("moestream:prefix_cache_hits_total", ())] == 0
