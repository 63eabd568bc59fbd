"""The `moestream` command: serve, generate, inspect, cache-sim and the benchmarks.

Every error a user can cause prints one line naming what is wrong and exits with code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from moestream.kernels.errors import MoestreamError
from moestream.server.options import KERNEL_CHOICES, KERNELS_HELP, MISS_POLICIES, MISS_POLICY_HELP, engine_options

EXIT_USAGE = 2


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", required=True, help="path of a .gguf model file")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--vram-budget", default=None,
                   help="device memory for the model, e.g. 1GiB, 6GB (default: free GPU memory "
                        "minus a margin; on the CPU everything stays in host memory)")
    p.add_argument("--max-cached-experts", type=int, default=None,
                   help="cap the expert cache slots below what the budget allows")
    p.add_argument("--ctx-size", type=int, default=4096, help="longest sequence in tokens")
    p.add_argument("--no-pin", action="store_true",
                   help="read experts from the memory map instead of pinned host memory")
    p.add_argument("--no-prefetch", action="store_true", help="do not prefetch predicted experts")
    p.add_argument("--kernels", default=None, choices=KERNEL_CHOICES, help=KERNELS_HELP)
    p.add_argument("--miss-policy", default="auto", choices=MISS_POLICIES, help=MISS_POLICY_HELP)
    p.add_argument("--record-routing", default=None, metavar="FILE",
                   help="write each token's experts per layer to FILE (JSONL) for `moestream cache-sim`")


def cmd_inspect(args: argparse.Namespace) -> int:
    from moestream.server.inspect import describe

    print(describe(Path(args.file), vram_budget=args.vram_budget, ctx_size=args.ctx_size))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from moestream.engine import Engine, SamplingParams
    from moestream.engine.tokenizer import StreamDecoder

    engine = Engine.from_gguf(args.model, **engine_options(args))
    tok = engine.tokenizer
    if args.chat:
        prompt_ids = engine.chat_prompt_ids([{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = tok.encode(args.prompt, add_special=True)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    decoder = StreamDecoder(tok)
    for out in engine.generate(prompt_ids, params):
        if not (out.finish_reason == "stop" and out.token_id in tok.eos_ids):
            sys.stdout.write(decoder.push(out.token_id))
            sys.stdout.flush()
    sys.stdout.write(decoder.flush() + "\n")
    engine.close()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from moestream.server.app import serve

    return serve(args)


def cmd_cache_sim(args: argparse.Namespace) -> int:
    from moestream.offload.cachesim import main as cache_sim_main

    return cache_sim_main(args.rest)


def _add_serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a model on the OpenAI API (chat, completions, models, /metrics)",
        description="Serve a GGUF MoE model on an OpenAI-compatible HTTP API. Each flag can also "
                    "be set by the environment variable in brackets (for Docker); a flag on the "
                    "command line wins.")

    def option(flag: str, env: str, help: str, **kwargs) -> None:
        if kwargs.get("action") == "store_true":
            default = os.environ.get(env, "").lower() in ("1", "true", "yes", "on")
        else:
            default = os.environ.get(env, kwargs.pop("default", None))
        p.add_argument(flag, default=default, help=f"{help} [{env}]", **kwargs)

    option("--model", "MOESTREAM_MODEL", "a .gguf file, or hf:OWNER/REPO/FILE.gguf to download it "
           "into the Hugging Face cache")
    option("--demo", "MOESTREAM_DEMO", "serve a small synthetic MoE with random weights (gibberish "
           "text) to try the API and dashboards without a model", action="store_true")
    option("--host", "MOESTREAM_HOST", "address to bind; 0.0.0.0 exposes the server to the network",
           default="127.0.0.1")
    option("--port", "MOESTREAM_PORT", "TCP port", type=int, default=8000)
    option("--api-key", "MOESTREAM_API_KEY", "require 'Authorization: Bearer KEY' on /v1 "
           "(/health and /metrics stay open)")
    option("--allowed-origins", "MOESTREAM_ALLOWED_ORIGINS", "comma-separated origins whose browsers "
           "may call the API (CORS), e.g. http://localhost:3000, or * for any; default: none", default="")
    option("--served-model-name", "MOESTREAM_SERVED_MODEL_NAME",
           "the model id clients send (default: the file name without .gguf)")
    option("--device", "MOESTREAM_DEVICE", "cpu or cuda (default: cuda when available)")
    option("--vram-budget", "MOESTREAM_VRAM_BUDGET", "device memory for the model, e.g. 2GiB "
           "(default: free GPU memory minus a margin)")
    option("--max-cached-experts", "MOESTREAM_MAX_CACHED_EXPERTS",
           "cap the expert cache slots below what the budget allows", type=int)
    option("--ctx-size", "MOESTREAM_CTX_SIZE", "longest sequence in tokens (prompt + output)",
           type=int, default=4096)
    option("--max-batch", "MOESTREAM_MAX_BATCH", "sequences decoded together", type=int, default=8)
    option("--max-batched-tokens", "MOESTREAM_MAX_BATCHED_TOKENS", "prefill tokens per step",
           type=int, default=256)
    option("--max-waiting", "MOESTREAM_MAX_WAITING", "queued requests before new ones get 503 "
           "with Retry-After", type=int, default=64)
    option("--shutdown-grace", "MOESTREAM_SHUTDOWN_GRACE", "seconds SIGTERM waits for requests in "
           "flight to finish", type=float, default=30.0)
    option("--no-pin", "MOESTREAM_NO_PIN", "read experts from the memory map instead of pinned "
           "host memory", action="store_true")
    option("--no-prefetch", "MOESTREAM_NO_PREFETCH", "do not prefetch predicted experts",
           action="store_true")
    option("--kernels", "MOESTREAM_KERNELS", KERNELS_HELP, choices=KERNEL_CHOICES)
    option("--miss-policy", "MOESTREAM_MISS_POLICY", MISS_POLICY_HELP, choices=MISS_POLICIES,
           default="auto")
    option("--record-routing", "MOESTREAM_RECORD_ROUTING", "write each token's experts per layer "
           "to this JSONL file, for `moestream cache-sim`")
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    from moestream.tools import bench, perplexity, synth

    parser = argparse.ArgumentParser(prog="moestream", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="describe a GGUF model and where it would be placed")
    p.add_argument("file")
    p.add_argument("--vram-budget", default=None)
    p.add_argument("--ctx-size", type=int, default=4096)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("generate", help="generate text from a prompt, streamed to stdout")
    _add_model_args(p)
    p.add_argument("--prompt", "-p", required=True)
    p.add_argument("--max-tokens", "-n", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.set_defaults(func=cmd_generate)

    _add_serve_parser(sub)

    p = sub.add_parser("synth", help="write a random-weight GGUF with a real model's shapes and quant mix")
    synth.add_synth_args(p)
    p.set_defaults(func=synth.synth_main)

    p = sub.add_parser("bench", help="prefill/decode tok/s, TTFT, memory; --vs-llama-cpp runs llama.cpp too")
    bench.add_bench_args(p)
    p.set_defaults(func=bench.bench_main)

    p = sub.add_parser("perplexity", help="perplexity of a text, llama.cpp's method")
    perplexity.add_perplexity_args(p)
    p.set_defaults(func=perplexity.perplexity_main)

    p = sub.add_parser("cache-sim", help="replay routing traces through LRU/LFU/Belady caches",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_cache_sim)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except MoestreamError as exc:
        print(f"moestream: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
