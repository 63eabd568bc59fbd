"""The `moestream` command: serve, generate, inspect, cache-sim and the benchmarks.

Every error a user can cause prints one line naming what is wrong and exits with code 2;
flags are checked while parsing, before a model loads or a port is bound.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from moestream.kernels.errors import MoestreamError
from moestream.server.limits import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_REQUEST_TIMEOUT_S
from moestream.server.options import (DENSE_WEIGHTS_HELP, DEVICE_HELP, KERNEL_CHOICES, KERNELS_HELP,
                                      KV_DTYPE_CHOICES, KV_DTYPE_HELP, KV_TOKENS_HELP, MISS_POLICIES,
                                      MISS_POLICY_HELP, NO_PREFIX_CACHE_HELP, REASONING_FORMATS, add_memory_args,
                                      add_threads_arg, apply_threads,
                                      device_arg, engine_options, one_of, port_arg, positive_int, size_arg)

EXIT_USAGE = 2
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ENV_PREFIX = "MOESTREAM_"

log = logging.getLogger("moestream")


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block above them)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default unless its help already says it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        no_default = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if "default" in text or no_default or not action.option_strings:
            return text
        return super()._get_help_string(action)


def env_name(flag: str) -> str:
    """The environment variable of a `serve` flag: --vram-budget -> MOESTREAM_VRAM_BUDGET."""
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", required=True, help="path of a .gguf model file")
    p.add_argument("--device", default=None, type=device_arg, help=DEVICE_HELP)
    p.add_argument("--vram-budget", default=None, type=size_arg,
                   help="device memory for the model, e.g. 1GiB, 6GB (default: free GPU memory "
                        "minus a margin; on the CPU everything stays in host memory)")
    p.add_argument("--max-cached-experts", type=positive_int, default=None,
                   help="cap the expert cache slots below what the budget allows (on the CPU: use "
                        "an expert cache at all)")
    p.add_argument("--ctx-size", type=positive_int, default=4096,
                   help="longest sequence in tokens (capped by the model's trained context)")
    p.add_argument("--no-pin", action="store_true",
                   help="read experts from the memory map instead of pinned host memory")
    p.add_argument("--no-prefetch", action="store_true", help="do not prefetch predicted experts")
    p.add_argument("--no-prefix-cache", action="store_true", help=NO_PREFIX_CACHE_HELP)
    p.add_argument("--kernels", default=None, type=one_of(KERNEL_CHOICES, "kernels"), choices=KERNEL_CHOICES,
                   help=KERNELS_HELP)
    p.add_argument("--miss-policy", default="auto", type=one_of(MISS_POLICIES, "miss policy"),
                   choices=MISS_POLICIES, help=MISS_POLICY_HELP)
    p.add_argument("--record-routing", default=None, metavar="FILE",
                   help="write each token's experts per layer to FILE (JSONL) for `moestream cache-sim`")
    add_memory_args(p)
    add_threads_arg(p)


def cmd_inspect(args: argparse.Namespace) -> int:
    from moestream.server.inspect import describe, plan_json

    show = plan_json if args.json else describe
    print(show(Path(args.file), args.plan_for, args.vram_budget, ctx_size=args.ctx_size, max_batch=args.max_batch,
               kv_tokens=args.kv_tokens, kv_dtype=args.kv_dtype, dense_weights=args.dense_weights))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from moestream.engine import Engine, SamplingParams
    from moestream.engine.startup_check import check_startup
    from moestream.engine.tokenizer import StreamDecoder
    from moestream.server.timings import GenerationTimings

    options = engine_options(args)
    apply_threads(args.threads)
    log.info("loading %s on %s", args.model, options["device"])
    load_start_s = time.perf_counter()
    engine = Engine.from_gguf(args.model, **options, max_batch=1)
    load_s = time.perf_counter() - load_start_s
    log.info("loaded in %.1f s", load_s)
    check_startup(engine)
    tok = engine.tokenizer
    if args.chat:
        prompt_ids = engine.chat_prompt_ids([{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = tok.encode(args.prompt, add_special=True)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    decoder = StreamDecoder(tok)
    start_s = time.perf_counter()
    first_token_s = None
    n_generated = 0
    for out in engine.generate(prompt_ids, params):
        if first_token_s is None:
            first_token_s = time.perf_counter()
        n_generated += 1
        if not (out.finish_reason == "stop" and out.token_id in tok.eos_ids):
            sys.stdout.write(decoder.push(out.token_id))
            sys.stdout.flush()
    end_s = time.perf_counter()
    sys.stdout.write(decoder.flush() + "\n")
    sys.stdout.flush()
    engine.close()
    first_token_s = first_token_s or end_s
    timings = GenerationTimings(load_s=load_s, prompt_tokens=len(prompt_ids), prompt_s=first_token_s - start_s,
                                decode_tokens=max(0, n_generated - 1), decode_s=end_s - first_token_s)
    print(timings.report(), file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from moestream.server.app import serve

    return serve(args)


def _add_serve_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "serve", parents=[common], formatter_class=HelpFormatter,
        help="serve a model on the OpenAI API (chat, completions, models, /metrics)",
        description="Serve a GGUF MoE model on an OpenAI-compatible HTTP API. Each flag can also "
                    "be set by the environment variable in brackets (for Docker); a flag on the "
                    "command line wins.")

    def option(flag: str, env: str, help: str, short: str | None = None, **kwargs) -> None:
        # One naming rule, which serve_environment() (Docker's list of variables) relies on.
        assert env == env_name(flag), f"{flag}: name its variable {env_name(flag)}"
        if kwargs.get("action") == "store_true":
            default = os.environ.get(env, "").lower() in ("1", "true", "yes", "on")
        else:
            default = os.environ.get(env, kwargs.pop("default", None))
        p.add_argument(flag, *([short] if short else []), default=default, help=f"{help} [{env}]", **kwargs)

    option("--model", "MOESTREAM_MODEL", "a .gguf file, or hf:OWNER/REPO/FILE.gguf to download it "
           "into the Hugging Face cache (default: none; give it or --demo)", short="-m")
    option("--demo", "MOESTREAM_DEMO", "serve a small synthetic MoE with random weights (gibberish "
           "text) to try the API and dashboards without a model", action="store_true")
    option("--host", "MOESTREAM_HOST", "address to bind; 0.0.0.0 exposes the server to the network",
           default="127.0.0.1")
    option("--port", "MOESTREAM_PORT", "TCP port", type=port_arg, default=8000)
    option("--api-key", "MOESTREAM_API_KEY", "require 'Authorization: Bearer KEY' on /v1 "
           "(/health and /metrics stay open; default: none, /v1 is open)")
    option("--allowed-origins", "MOESTREAM_ALLOWED_ORIGINS", "comma-separated origins whose browsers "
           "may call the API (CORS), e.g. http://localhost:3000, or * for any; default: none", default="")
    option("--served-model-name", "MOESTREAM_SERVED_MODEL_NAME",
           "the model id clients send (default: the file name without .gguf)")
    option("--device", "MOESTREAM_DEVICE", DEVICE_HELP, type=device_arg)
    option("--vram-budget", "MOESTREAM_VRAM_BUDGET", "device memory for the model, e.g. 6GiB "
           "(default: free GPU memory minus a margin; on the CPU everything stays in host memory)",
           type=size_arg)
    option("--max-cached-experts", "MOESTREAM_MAX_CACHED_EXPERTS",
           "cap the expert cache slots below what the budget allows (on the CPU: use an expert cache "
           "at all)", type=positive_int)
    option("--ctx-size", "MOESTREAM_CTX_SIZE", "longest sequence in tokens (prompt + output; capped by "
           "the model's trained context)", type=positive_int, default=4096)
    option("--max-batch", "MOESTREAM_MAX_BATCH", "sequences decoded together", type=positive_int, default=8)
    option("--kv-tokens", "MOESTREAM_KV_TOKENS", KV_TOKENS_HELP, type=positive_int)
    option("--kv-dtype", "MOESTREAM_KV_DTYPE", KV_DTYPE_HELP, type=one_of(KV_DTYPE_CHOICES, "KV dtype"),
           choices=KV_DTYPE_CHOICES, default="f16")
    option("--dense-weights", "MOESTREAM_DENSE_WEIGHTS", DENSE_WEIGHTS_HELP, action="store_true")
    option("--max-batched-tokens", "MOESTREAM_MAX_BATCHED_TOKENS", "prefill tokens per step",
           type=positive_int, default=256)
    option("--max-waiting", "MOESTREAM_MAX_WAITING", "queued requests before new ones get 503 "
           "with Retry-After", type=positive_int, default=64)
    option("--max-request-bytes", "MOESTREAM_MAX_REQUEST_BYTES", "largest request body in bytes; "
           "a larger one gets 413", type=positive_int, default=DEFAULT_MAX_REQUEST_BYTES)
    option("--request-timeout", "MOESTREAM_REQUEST_TIMEOUT", "seconds a client has to send a "
           "request's head, and then its body, before the connection is cut", type=float,
           default=DEFAULT_REQUEST_TIMEOUT_S)
    option("--shutdown-grace", "MOESTREAM_SHUTDOWN_GRACE", "seconds SIGTERM waits for requests in "
           "flight to finish", type=float, default=30.0)
    option("--no-pin", "MOESTREAM_NO_PIN", "read experts from the memory map instead of pinned "
           "host memory", action="store_true")
    option("--no-prefetch", "MOESTREAM_NO_PREFETCH", "do not prefetch predicted experts",
           action="store_true")
    option("--no-prefix-cache", "MOESTREAM_NO_PREFIX_CACHE", NO_PREFIX_CACHE_HELP, action="store_true")
    option("--kernels", "MOESTREAM_KERNELS", KERNELS_HELP, type=one_of(KERNEL_CHOICES, "kernels"),
           choices=KERNEL_CHOICES)
    option("--miss-policy", "MOESTREAM_MISS_POLICY", MISS_POLICY_HELP,
           type=one_of(MISS_POLICIES, "miss policy"), choices=MISS_POLICIES, default="auto")
    option("--record-routing", "MOESTREAM_RECORD_ROUTING", "write each token's experts per layer "
           "to this JSONL file, for `moestream cache-sim` (default: off)")
    option("--reasoning-format", "MOESTREAM_REASONING_FORMAT", "auto: a chat reply's thinking comes "
           "back as reasoning_content, apart from content, when the chat template has a reasoning format "
           "(<think> tags, gpt-oss's harmony channels), as llama-server's deepseek format and vLLM do; "
           "none: the text as the model wrote it", type=one_of(REASONING_FORMATS, "reasoning format"),
           choices=REASONING_FORMATS, default="auto")
    option("--threads", "MOESTREAM_THREADS", "CPU threads for the compiled kernels and torch, as "
           "llama.cpp's -t (default: $OMP_NUM_THREADS if set, else the physical cores)",
           short="-t", type=positive_int)
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    from moestream.offload import cachesim
    from moestream.tools import bench, perplexity, synth

    parser = Parser(prog="moestream", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    log_level_help = "how much to log: " + ", ".join(LOG_LEVELS)
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS, help=log_level_help)
    # The same flag after the subcommand; SUPPRESS keeps the value given before it, if any.
    common = Parser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS, type=str.upper, choices=LOG_LEVELS,
                        help=log_level_help + " (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="`moestream COMMAND --help` describes each")

    def command(name: str, help: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common], formatter_class=HelpFormatter,
                              **kwargs)

    p = command("inspect", "describe a GGUF model and where its bytes would be placed")
    p.add_argument("file", help="the .gguf file")
    p.add_argument("--vram-budget", default=None, type=size_arg,
                   help="also print the memory plan for this device budget, e.g. 4GiB (default: no plan "
                        "in the text form)")
    p.add_argument("--ctx-size", type=positive_int, default=4096,
                   help="longest sequence in tokens (capped by the model's trained context)")
    p.add_argument("--max-batch", type=positive_int, default=8,
                   help="sequences decoded together (serve's default; generate and bench use 1)")
    add_memory_args(p)
    p.add_argument("--plan-for", default="cuda", type=one_of(("cuda", "cpu"), "device to plan for"),
                   choices=("cuda", "cpu"), help="the device to plan for, whatever this machine has")
    p.add_argument("--json", action="store_true",
                   help="print the memory plan as JSON, from the header alone (fits=false when it does not fit)")
    p.set_defaults(func=cmd_inspect)

    p = command("generate", "generate text from a prompt, streamed to stdout; timings on stderr")
    _add_model_args(p)
    p.add_argument("--prompt", "-p", required=True, help="the prompt text")
    p.add_argument("--max-tokens", "-n", type=positive_int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 is off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1.0 is off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.set_defaults(func=cmd_generate)

    _add_serve_parser(sub, common)

    p = command("synth", "write a random-weight GGUF with a real model's shapes and quant mix")
    synth.add_synth_args(p)
    p.set_defaults(func=synth.synth_main)

    p = command("bench", "prefill/decode tok/s, TTFT, memory; --vs-llama-cpp runs llama.cpp too")
    bench.add_bench_args(p)
    p.set_defaults(func=bench.bench_main)

    p = command("perplexity", "perplexity of a text, llama.cpp's method")
    perplexity.add_perplexity_args(p)
    p.set_defaults(func=perplexity.perplexity_main)

    p = command("cache-sim", "replay routing traces through LRU/LFU/Belady caches")
    cachesim.add_cache_sim_args(p)
    p.set_defaults(func=cachesim.cache_sim_main)
    return parser


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """{name: parser} of the subcommands."""
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def serve_environment() -> dict[str, str]:
    """{MOESTREAM_* variable: flag} for every `serve` flag, read from the parser itself."""
    serve = subcommands(build_parser())["serve"]
    return {env_name(a.option_strings[0]): a.option_strings[0] for a in serve._actions
            if a.option_strings and a.dest not in ("help", "log_level")}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except MoestreamError as exc:
        print(f"moestream: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
