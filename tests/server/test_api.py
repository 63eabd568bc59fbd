"""The OpenAI API of a live server on the tiny OLMoE fixture, through the official client.

Texts are checked against independent references: transformers' greedy tokens (full
recomputation, one request at a time) turned into text by llama.cpp's detokenizer, and
prompt lengths counted by llama.cpp's tokenizer.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import openai
import pytest
import torch

from tests.fixtures.models import get_fixture, hf_model, sample_token_ids
from tests.server.conftest import CTX_SIZE, MODEL_NAME

GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def llama_vocab(olmoe_gguf):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(olmoe_gguf), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def hf_greedy(prompt: list[int], n: int) -> list[int]:
    """The greedy continuation of `prompt` alone, by transformers."""
    model = hf_model(get_fixture("olmoe"))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def chatml(messages: list[dict]) -> str:
    """The fixture's ChatML template, written out by hand."""
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def greedy_text(client: openai.OpenAI, prompt, max_tokens: int) -> str:
    out = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, **GREEDY)
    return out.choices[0].text


# -- models and health ---------------------------------------------------------------
def test_health_needs_no_key_and_models_lists_the_served_name(server):
    health = httpx.get(f"{server.url}/health")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    raw = httpx.get(f"{server.url}/v1/models", headers=server.headers()).json()
    assert raw["object"] == "list"
    assert raw["data"][0]["object"] == "model" and raw["data"][0]["max_model_len"] == CTX_SIZE


# -- completions and chat ------------------------------------------------------------
def reference_text(llama_vocab, prompt: list[int], n: int) -> str:
    expected_ids = hf_greedy(prompt, n)
    assert max(expected_ids) < get_fixture("olmoe").vocab_size - 3, "reference reached a control token"
    return llama_vocab.detokenize(expected_ids).decode("utf-8", errors="replace")


def test_greedy_completion_matches_transformers(server, llama_vocab):
    prompt = sample_token_ids(get_fixture("olmoe"), 9, seed=21)
    out = server.client().completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=10, **GREEDY)
    assert out.choices[0].text == reference_text(llama_vocab, prompt, 10)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (9, 10, 19)


def test_text_prompt_is_tokenized_like_llama_cpp(server, llama_vocab):
    text = "the quick brown fox<|im_end|>"
    expected_ids = llama_vocab.tokenize(text.encode(), add_bos=False, special=True)
    out = server.client().completions.create(model=MODEL_NAME, prompt=text, max_tokens=4, **GREEDY)
    assert out.usage.prompt_tokens == len(expected_ids)
    assert out.choices[0].text == greedy_text(server.client(), expected_ids, 4)


def test_chat_usage_counts_the_templated_prompt(server, llama_vocab):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    expected_prompt = llama_vocab.tokenize(chatml(messages).encode(), add_bos=False, special=True)
    out = server.client().chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0,
                                                  extra_body={"ignore_eos": True, "unknown_field": [1, 2]})
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert out.usage.prompt_tokens == len(expected_prompt)
    assert out.usage.completion_tokens == 6
    # The same prompt as token ids on /v1/completions gives the same greedy text.
    assert greedy_text(server.client(), expected_prompt, 6) == choice.message.content
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")


def test_chat_logprobs_name_the_chosen_tokens(server, llama_vocab):
    messages = [{"role": "user", "content": "count"}]
    prompt = llama_vocab.tokenize(chatml(messages).encode(), add_bos=False, special=True)
    expected_ids = hf_greedy(prompt, 5)
    out = server.client().chat.completions.create(model=MODEL_NAME, messages=messages, max_completion_tokens=5,
                                                  logprobs=True, top_logprobs=3, **GREEDY)
    content = out.choices[0].logprobs.content
    assert [bytes(c.bytes) for c in content] == [llama_vocab.detokenize([t]) for t in expected_ids]
    for c in content:
        assert len(c.top_logprobs) == 3
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob)  # greedy took the top one
        assert c.logprob <= 0 and c.top_logprobs[0].logprob >= c.top_logprobs[2].logprob


def test_streaming_chat_follows_the_chunk_protocol(server):
    messages = [{"role": "user", "content": "stream me"}]
    client = server.client()
    whole = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12, **GREEDY)
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}, **GREEDY))
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant" and not chunks[0].choices[0].delta.content
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    choice_chunks = [c for c in chunks if c.choices]
    assert [c.choices[0].finish_reason for c in choice_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in choice_chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in choice_chunks)
    assert text == whole.choices[0].message.content
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.model_dump(exclude={"prompt_tokens_details"}) == whole.usage.model_dump(
        exclude={"prompt_tokens_details"})
    # the same prompt again: the prefix cache serves its full blocks but the last token's
    assert usage.prompt_tokens_details.cached_tokens == (usage.prompt_tokens - 1) // 16 * 16
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_completion_without_usage(server):
    prompt = sample_token_ids(get_fixture("olmoe"), 5, seed=31)
    client = server.client()
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=8, stream=True, **GREEDY))
    assert all(c.choices and c.usage is None for c in chunks), "no usage chunk unless asked for"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks) == greedy_text(client, prompt, 8)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_ends_the_text_before_it(server, stream):
    client = server.client()
    prompt = sample_token_ids(get_fixture("olmoe"), 7, seed=41)
    full = greedy_text(client, prompt, 16)
    # A 3-letter piece of the greedy text: tokens are 1-2 characters, so it spans a boundary.
    start = next(i for i in range(4, len(full) - 3) if full[i:i + 3].isalpha())
    stop = full[start:start + 3]
    cut = full.find(stop)
    request = dict(model=MODEL_NAME, prompt=prompt, max_tokens=16, stop=["\u2603never", stop], **GREEDY)
    if stream:
        chunks = list(client.completions.create(stream=True, **request))
        pieces = [c.choices[0].text for c in chunks]
        assert not any(stop in p for p in pieces)
        text, finish = "".join(pieces), chunks[-1].choices[0].finish_reason
    else:
        out = client.completions.create(**request)
        text, finish = out.choices[0].text, out.choices[0].finish_reason
        assert out.usage.completion_tokens < 16
    assert (text, finish) == (full[:cut], "stop")


def test_seed_makes_sampling_reproducible(server):
    client = server.client()
    messages = [{"role": "user", "content": "surprise me"}]

    def sample(seed: int) -> str:
        out = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=1.0,
                                             seed=seed, extra_body={"ignore_eos": True})
        return out.choices[0].message.content

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first


def test_16_concurrent_streams_equal_each_request_alone(server, llama_vocab):
    fixture = get_fixture("olmoe")
    prompts = [sample_token_ids(fixture, 4 + i, seed=100 + i) for i in range(16)]
    alone = [reference_text(llama_vocab, p, 10) for p in prompts]

    async def stream(client: openai.AsyncOpenAI, prompt: list[int]) -> str:
        chunks = await client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=10, stream=True,
                                                 **GREEDY)
        return "".join([c.choices[0].text async for c in chunks])

    async def all_at_once() -> list[str]:
        async with server.async_client() as client:
            return await asyncio.gather(*(stream(client, p) for p in prompts))

    assert asyncio.run(all_at_once()) == alone


# -- disconnects and metrics ---------------------------------------------------------
def wait_for_idle(server, timeout_s: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        m = server.metrics()
        idle = (m[("moestream:num_requests_running", ())] == 0 and m[("moestream:num_requests_waiting", ())] == 0
                and m[("moestream:kv_cache_usage_perc", ())] == 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def wait_until_running(server, timeout_s: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while (m := server.metrics())[("moestream:num_requests_running", ())] != 1:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.05)
    return m


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_the_sequence(server, stream):
    before = wait_for_idle(server)
    body = {"model": MODEL_NAME, "prompt": "tell me a long story", "max_tokens": CTX_SIZE - 16, "stream": stream,
            "ignore_eos": True, "temperature": 0}
    payload = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {server.api_key}\r\nContent-Length: {len(payload)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + payload)
        busy = wait_until_running(server)
        assert busy[("moestream:kv_cache_usage_perc", ())] > 0
    # The connection closed mid-response.
    after = wait_for_idle(server)
    assert after[("moestream:num_requests_running", ())] == 0
    assert after[("moestream:kv_cache_usage_perc", ())] == 0.0, "KV blocks not freed"
    key = ("moestream:request_success_total", (("finished_reason", "abort"),))
    assert after[key] == before.get(key, 0) + 1


METRIC_FAMILIES = [
    "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
    "generation_tokens_total", "time_to_first_token_seconds_count", "inter_token_latency_seconds_count",
    "e2e_request_latency_seconds_count", "request_queue_time_seconds_count", "request_prefill_time_seconds_count",
    "request_decode_time_seconds_count", "request_prompt_tokens_count", "request_generation_tokens_count",
    "expert_cache_hits_total", "expert_cache_misses_total", "expert_cache_evictions_total",
    "expert_bytes_to_device_total", "expert_copy_seconds_total", "expert_copy_stall_seconds_total",
    "expert_prefetch_issued_total", "expert_prefetch_used_total", "model_info",
]


def test_metrics_move_by_the_request(server):
    before = wait_for_idle(server)
    prompt = sample_token_ids(get_fixture("olmoe"), 13, seed=51)
    server.client().completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=5, **GREEDY)
    after = server.metrics()
    names = {name for name, _ in after}
    assert {f"moestream:{f}" for f in METRIC_FAMILIES} <= names

    def delta(name: str, labels: tuple = ()) -> float:
        return after[(f"moestream:{name}", labels)] - before.get((f"moestream:{name}", labels), 0)

    assert delta("prompt_tokens_total") == 13 and delta("generation_tokens_total") == 5
    assert delta("request_success_total", (("finished_reason", "length"),)) == 1
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_prefill_time_seconds", "request_decode_time_seconds"):
        assert delta(f"{hist}_count") == 1, hist
    assert delta("inter_token_latency_seconds_count") == 4
    assert delta("request_prompt_tokens_sum") == 13 and delta("request_generation_tokens_sum") == 5
    lookups = sum(delta(f"expert_cache_{kind}_total", (("layer", str(layer)),))
                  for kind in ("hits", "misses") for layer in (0, 1))
    # Each of the 5 forward passes looks up at least top-k (2) experts in each of 2 layers.
    assert lookups >= 5 * 2 * 2


# -- errors --------------------------------------------------------------------------
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
LONG_PROMPT = list(range(CTX_SIZE + 10))


@pytest.mark.parametrize("path, body, status, error_type, param", [
    (CHAT, b'{"model": "tiny-olmoe", "messages": [', 400, "invalid_request_error", None),
    (CHAT, {"messages": "hi"}, 400, "invalid_request_error", "messages"),
    (CHAT, {"messages": MESSAGES, "temperature": "hot"}, 400, "invalid_request_error", "temperature"),
    (CHAT, {"messages": MESSAGES, "max_tokens": -1}, 400, "invalid_request_error", "max_tokens"),
    (CHAT, {"messages": MESSAGES, "n": 17}, 400, "invalid_request_error", "n"),
    (CHAT, {"messages": MESSAGES, "top_logprobs": 99, "logprobs": True}, 400, "invalid_request_error",
     "top_logprobs"),
    (CHAT, {"messages": [{"role": "user", "content": "word " * CTX_SIZE}]}, 400, "invalid_request_error",
     "messages"),
    (CHAT, {"model": "gpt-9", "messages": MESSAGES}, 404, "not_found_error", "model"),
    (COMPLETIONS, {"prompt": LONG_PROMPT}, 400, "invalid_request_error", "prompt"),
    (COMPLETIONS, {"prompt": [1, 2, 10**6]}, 400, "invalid_request_error", "prompt"),
    (COMPLETIONS, {"prompt": ["a", "b"]}, 400, "invalid_request_error", "prompt"),
    (COMPLETIONS, {"prompt": "hi", "echo": True}, 400, "invalid_request_error", "echo"),
    ("/v1/embeddings", {"input": "hi"}, 404, "not_found_error", None),
], ids=["malformed-json", "messages-type", "temperature-type", "negative-max-tokens", "n=17", "top-logprobs",
        "chat-too-long", "unknown-model", "prompt-too-long", "token-out-of-vocab", "batch-prompt", "echo",
        "unknown-route"])
def test_bad_request_gets_an_openai_error(server, path, body, status, error_type, param):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    response = server.post(path, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["type"], error["param"]) == (error_type, param)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}], ids=["missing", "wrong"])
def test_api_key_is_required_on_v1_only(server, headers):
    response = httpx.post(f"{server.url}{CHAT}", json={"messages": MESSAGES}, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server.url}/metrics").status_code == 200


def test_client_raises_the_matching_errors_and_the_server_still_serves(server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model=MODEL_NAME, messages=MESSAGES, n=17)
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="gpt-9", messages=MESSAGES)
    out = server.client().chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2, **GREEDY)
    assert out.usage.completion_tokens == 2
