"""Time to first token of a multi-turn chat with and without the prompt prefix cache:
`python -m bench.prefix_cache [--model FILE.gguf]` (default: the `serve --demo` model).

A conversation of `--turns` turns under one long system prompt is played through an engine
with the prefix cache: each turn's prompt is the whole history (system prompt, earlier
questions and the model's greedy replies) rendered by the model's chat template; right after
each turn the same prompt goes to a second engine without the cache (interleaved, so a
change of load on a shared machine hits both sides alike). Per turn it
prints the prompt tokens, the tokens the cache served and both times to first token (from
add_request to the first sampled token; no server, no HTTP), the median of `--repeats`
plays (the cache emptied before each). One untimed request warms each engine first
(kernel builds, first-touch of the weights).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moestream.engine import Engine, SamplingParams
from moestream.engine.engine_config import default_kernels

SYSTEM = ("You are a careful assistant for a team that runs large mixture-of-experts models on small "
          "GPUs. Answer in short paragraphs, cite the configuration flag that matters, and say when a "
          "measurement would settle the question rather than guessing. ")
QUESTIONS = ["How does the expert cache decide what to evict?", "What does the router compute?",
             "Why is prefill faster per token than decode?", "When should I lower --ctx-size?",
             "What does --kv-dtype change?", "How are shared experts placed?",
             "What does the prefetcher predict?", "How large should the VRAM budget be?"]


def first_token_s(engine: Engine, prompt_ids: list[int], max_tokens: int) -> tuple[float, list[int], int]:
    """(seconds to the first token, the generated ids, prompt tokens served by the cache)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    start_s = time.perf_counter()
    seq = engine.add_request(prompt_ids, params)
    ids, first_s = [], None
    while not seq.is_finished:
        for out in engine.step():
            if out.seq_id == seq.seq_id:
                first_s = first_s or time.perf_counter() - start_s
                ids.append(out.token_id)
    return first_s, ids, seq.num_cached_tokens or 0


def play(engine: Engine, plain: Engine, turns: int, system_repeat: int,
         reply_tokens: int) -> list[tuple[list[int], float, float, int]]:
    """Each turn's (prompt ids, TTFT with the cache, TTFT without, cached tokens), the
    replies generated as it goes."""
    messages = [{"role": "system", "content": SYSTEM * system_repeat}]
    rows = []
    for turn in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        prompt = engine.chat_prompt_ids(messages)
        ttft, ids, cached = first_token_s(engine, prompt, reply_tokens)
        rows.append((prompt, ttft, first_token_s(plain, prompt, 1)[0], cached))
        messages.append({"role": "assistant", "content": engine.tokenizer.decode(ids)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a .gguf file (default: the demo model)")
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--system-repeat", type=int, default=4, help="copies of the system paragraph")
    p.add_argument("--reply-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kernels", default=None, help="as serve's --kernels (default: q8 on the CPU)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from moestream.server.demo import demo_model_path
        args.model = str(demo_model_path())
    options = dict(kernel_backend=default_kernels("cpu", args.kernels), ctx_size=2048)
    engines = {flag: Engine.from_gguf(args.model, prefix_cache=flag, **options) for flag in (True, False)}
    for engine in engines.values():
        first_token_s(engine, [engine.tokenizer.bos_id or 1] * 7, 2)
    with_cache: list[list[float]] = [[] for _ in range(args.turns)]
    without: list[list[float]] = [[] for _ in range(args.turns)]
    for _ in range(args.repeats):
        engines[True].kv.blocks.reset()
        rows = play(engines[True], engines[False], args.turns, args.system_repeat, args.reply_tokens)
        for turn, (_, hit, plain, _) in enumerate(rows):
            with_cache[turn].append(hit)
            without[turn].append(plain)
    print(f"model {args.model}; {torch.get_num_threads()} threads; kernels {options['kernel_backend']}; "
          f"median of {args.repeats}")
    print("| turn | prompt tokens | cached tokens | TTFT with cache ms | TTFT without ms | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    totals = [0.0, 0.0]
    for turn, (prompt, _, _, cached) in enumerate(rows):
        hit, plain = statistics.median(with_cache[turn]), statistics.median(without[turn])
        totals[0], totals[1] = totals[0] + hit, totals[1] + plain
        print(f"| {turn + 1} | {len(prompt)} | {cached} | {hit * 1e3:.1f} | {plain * 1e3:.1f} | {plain / hit:.2f} |")
    print(f"| all | | | {totals[0] * 1e3:.1f} | {totals[1] * 1e3:.1f} | {totals[1] / totals[0]:.2f} |")


if __name__ == "__main__":
    main()
