"""`moestream bench`: prefill/decode speed, TTFT and memory, optionally beside llama.cpp.

Each engine runs in its own worker process (so host RSS and peak VRAM are its own), loads
the model once, and the runs alternate between them: ours, llama.cpp, ours, ... Both get the
same prompt token ids (random ordinary tokens from the file's vocab, seeded), the same
lengths and the same CPU thread count, decode greedily and ignore EOS. Each figure is the
median over --repeat runs, after --warmup short runs that page the weights in.

llama.cpp on a GPU: all layers go to the GPU and the routed experts of the first
--n-cpu-moe layers (default: all) stay in host memory, as llama.cpp's --cpu-moe/--n-cpu-moe
do; llama-cpp-python 0.3.36 has no argument for tensor_buft_overrides, so
tools.llama_cpp_ref sets it in the model-params struct.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import statistics
import time
import traceback
from dataclasses import asdict, fields
from multiprocessing.connection import Connection

import numpy as np
from tqdm import tqdm

from moestream.engine.engine_config import default_kernels, default_threads
from moestream.kernels.errors import MoestreamError
from moestream.offload.hybrid import MissPolicy
from moestream.tools.decode_profile import StepProfiler, decode_breakdown_ms, format_breakdown
from moestream.tools.measure import (WARMUP_GEN_TOKENS, WARMUP_PROMPT_TOKENS, BenchConfig, RunMetrics,
                                     host_rss_bytes, timing_metrics)

# -- the engines, each inside its worker ------------------------------------------------
class MoestreamRunner:
    def __init__(self, config: BenchConfig):
        import torch

        from moestream.engine import Engine
        from moestream.engine.startup_check import check_startup

        torch.set_num_threads(config.threads)
        self.torch, self.config = torch, config
        self.engine = Engine.from_gguf(
            config.model, device=config.device, vram_budget=config.vram_budget,
            max_cached_experts=config.max_cached_experts,
            ctx_size=config.prompt_tokens + config.gen_tokens + 1, max_batch=1,
            max_batched_tokens=max(config.prompt_tokens, WARMUP_PROMPT_TOKENS),
            kernel_backend=config.kernels, miss_policy=config.miss_policy,
            simulate_link_gbps=config.simulate_link_gbps, replay_routing=config.replay_routing,
            # every repeat feeds the same prompt: a prompt cache would time its hits, not a
            # prefill (llama.cpp's runner resets its context each run too)
            prefix_cache=False)
        check_startup(self.engine)

    def run(self, prompt_ids: list[int], gen_tokens: int) -> RunMetrics:
        from moestream.engine import SamplingParams

        cuda = self.engine.device.type == "cuda"
        if cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        before = self.engine.stats()
        params = SamplingParams(max_tokens=gen_tokens, temperature=0.0, ignore_eos=True)
        profiler = StepProfiler(self.engine) if self.config.profile else None
        with profiler.installed() if profiler else contextlib.nullcontext():
            start, times = time.perf_counter(), []
            for _ in self.engine.generate(prompt_ids, params):
                times.append(time.perf_counter())
        after = self.engine.stats()
        return RunMetrics(
            **timing_metrics(len(prompt_ids), start, times),
            decode_profile_ms=decode_breakdown_ms(profiler.steps, times) if profiler else None,
            peak_vram_bytes=self.torch.cuda.max_memory_allocated() if cuda else 0,
            peak_reserved_vram_bytes=self.torch.cuda.max_memory_reserved() if cuda else 0,
            host_rss_bytes=host_rss_bytes(),
            **expert_metrics(before, after),
        )


def expert_metrics(before: dict, after: dict) -> dict[str, float | None]:
    """Hit rate and host->device rate of the expert lookups between two engine.stats()."""
    def delta(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    lookups, copy_s, misses = delta("expert_lookups"), delta("copy_s"), delta("expert_misses")
    return {"expert_hit_rate": delta("expert_hits") / lookups if lookups else None,
            "h2d_gb_s": delta("bytes_to_device") / copy_s / 1e9 if copy_s > 0 else None,
            "cpu_miss_share": delta("misses_on_cpu") / misses if misses else None}


def make_runner(name: str, config: BenchConfig):
    if name == "llama_cpp":
        from moestream.tools.llama_cpp_ref import LlamaCppRunner

        return LlamaCppRunner(config)
    return MoestreamRunner(config)


def _worker_main(conn: Connection, name: str, config: BenchConfig) -> None:
    try:
        runner = make_runner(name, config)
        conn.send(("ready", None))
        while (request := conn.recv()) is not None:
            conn.send(("ok", runner.run(*request)))
    except Exception as exc:  # reported to the parent, which raises it there
        message = str(exc) if isinstance(exc, MoestreamError) else traceback.format_exc()
        conn.send(("error", message))


class Worker:
    """One engine in a child process, answering run requests one at a time."""

    def __init__(self, name: str, config: BenchConfig):
        ctx = multiprocessing.get_context("spawn")  # CUDA and forked torch do not mix
        self.name = name
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, name, config), daemon=True)
        self.process.start()
        child.close()  # the child's end lives in the child only: its death is EOF here
        self._receive()

    def run(self, prompt_ids: list[int], gen_tokens: int) -> RunMetrics:
        self.conn.send((prompt_ids, gen_tokens))
        return self._receive()

    def _receive(self):
        try:
            status, payload = self.conn.recv()
        except EOFError as exc:
            self.process.join(timeout=10)
            raise MoestreamError(f"the {self.name} worker exited (code {self.process.exitcode})") from exc
        if status == "error":
            raise MoestreamError(f"{self.name}: {payload}")
        return payload

    def close(self) -> None:
        if self.process.is_alive():
            self.conn.send(None)
        self.process.join(timeout=30)


# -- the benchmark ----------------------------------------------------------------------
def prompt_token_ids(model: str, n: int, seed: int) -> list[int]:
    """`n` random ids of ordinary tokens (no control/special tokens) of the file's vocab."""
    import gguf

    reader = gguf.GGUFReader(model)
    field = reader.get_field("tokenizer.ggml.token_type")
    if field is None:
        raise MoestreamError(f"{model}: no tokenizer.ggml.token_type in the file; is it a model GGUF?")
    types = np.array([field.parts[i][0] for i in field.data])
    normal = np.flatnonzero(types == int(gguf.TokenType.NORMAL))
    return np.random.default_rng(seed).choice(normal, size=n).tolist()


def run_bench(config: BenchConfig, names: list[str], repeat: int, warmup: int, seed: int = 0,
              progress: bool = True) -> dict[str, list[RunMetrics]]:
    prompt = prompt_token_ids(config.model, config.prompt_tokens, seed)
    workers: list[Worker] = []
    try:
        for name in tqdm(names, desc="loading", disable=not progress):
            workers.append(Worker(name, config))
        for worker in workers:
            for _ in range(warmup):
                worker.run(prompt[:WARMUP_PROMPT_TOKENS], WARMUP_GEN_TOKENS)
        results: dict[str, list[RunMetrics]] = {name: [] for name in names}
        with tqdm(total=repeat * len(workers), desc="bench", disable=not progress) as bar:
            for _ in range(repeat):
                for worker in workers:
                    metrics = worker.run(prompt, config.gen_tokens)
                    results[worker.name].append(metrics)
                    bar.set_postfix_str(f"{worker.name} decode {metrics.decode_tok_s:.2f} tok/s")
                    bar.update()
        return results
    finally:
        for worker in workers:
            worker.close()


def summarize(runs: list[RunMetrics]) -> dict:
    """Median of each metric over the runs (None where a metric does not apply). The per-part
    profile is averaged instead: a mean of each part keeps the parts' sum the mean step."""
    summary = {}
    for f in fields(RunMetrics):
        values = [getattr(r, f.name) for r in runs if getattr(r, f.name) is not None]
        if values and isinstance(values[0], dict):
            keys = dict.fromkeys(key for v in values for key in v)
            summary[f.name] = {key: statistics.fmean([v.get(key, 0.0) for v in values]) for key in keys}
        else:
            summary[f.name] = statistics.median(values) if values else None
    return summary


_ROWS = [("prefill tok/s", "prefill_tok_s", 1.0, "{:.2f}"), ("decode tok/s", "decode_tok_s", 1.0, "{:.2f}"),
         ("TTFT s", "ttft_s", 1.0, "{:.3f}"), ("peak VRAM GiB", "peak_vram_bytes", 2**-30, "{:.2f}"),
         ("host RSS GiB", "host_rss_bytes", 2**-30, "{:.2f}"), ("expert hit rate", "expert_hit_rate", 1.0, "{:.3f}"),
         ("H2D GB/s", "h2d_gb_s", 1.0, "{:.2f}"), ("misses on CPU", "cpu_miss_share", 1.0, "{:.3f}")]


def format_table(summaries: dict[str, dict]) -> str:
    names = list(summaries)
    header = f"{'metric':<16}" + "".join(f"{n:>12}" for n in names)
    if len(names) == 2:
        header += f"{'ratio':>10}"
    lines = [header, "-" * len(header)]
    for label, key, scale, fmt in _ROWS:
        values = [summaries[n][key] for n in names]
        cells = "".join(f"{fmt.format(v * scale) if v is not None else '-':>12}" for v in values)
        if len(names) == 2:
            ok = None not in values and values[1]
            cells += f"{values[0] / values[1]:>10.3f}" if ok else f"{'-':>10}"
        lines.append(f"{label:<16}{cells}")
    return "\n".join(lines)


# -- command line -------------------------------------------------------------------------
def add_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", required=True, help="path of a .gguf model file")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--vram-budget", default=None, help="device memory for our engine, e.g. 4GiB")
    parser.add_argument("--max-cached-experts", type=int, default=None,
                        help="cap our expert cache slots (on the CPU: use a cache at all)")
    parser.add_argument("--threads", "-t", type=int, default=None,
                        help="CPU threads for both engines: torch and our compiled kernels, llama.cpp's -t "
                             "(default: $OMP_NUM_THREADS if set, else the physical cores)")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="prompt length of each run")
    parser.add_argument("--gen-tokens", type=int, default=128, help="tokens generated in each run")
    parser.add_argument("--repeat", type=int, default=3, help="measured runs per engine (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="short unmeasured runs per engine first")
    parser.add_argument("--vs-llama-cpp", action="store_true", help="run llama-cpp-python on the same prompt")
    parser.add_argument("--n-cpu-moe", type=int, default=None,
                        help="llama.cpp on a GPU: layers whose experts stay on the CPU (default: all)")
    parser.add_argument("--llama-cpp-no-repack", action="store_true",
                        help="llama.cpp without its repacked copy of the weights (--no-repack), reading the "
                             "mapped blocks as we do: for files whose copy does not fit in host memory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt token ids")
    parser.add_argument("--kernels", default=None, choices=("auto", "q8", "torch", "triton"),
                        help="our matmul kernels (default: q8 on the CPU, auto on CUDA; see "
                             "`moestream serve --help`)")
    parser.add_argument("--miss-policy", default="auto", choices=[p.value for p in MissPolicy],
                        help="what our expert cache misses do (see `moestream serve --help`)")
    parser.add_argument("--replay-routing", default=None, metavar="LOG",
                        help="our engine routes from this real routing log (JSONL, shared/data/routing "
                             "or --record-routing) instead of its router: random-weight models route with "
                             "unrealistic locality; prefetch is off while replaying")
    parser.add_argument("--profile", action="store_true",
                        help="also time each part of our decode steps (expert kernels, attention, norms, "
                             "routing, Python) and print where a token goes; adds ~1 us per timed call")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def bench_main(args: argparse.Namespace) -> int:
    import torch

    from moestream.engine.loader import open_gguf

    if args.prompt_tokens < 1 or args.gen_tokens < 2:
        raise MoestreamError("--prompt-tokens must be >= 1 and --gen-tokens >= 2 (decode speed needs two tokens)")
    open_gguf(args.model)  # a corrupt file fails here, before any worker starts
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = BenchConfig(
        model=args.model, device=device,
        vram_budget=args.vram_budget, max_cached_experts=args.max_cached_experts,
        threads=args.threads or default_threads(),
        prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens, n_cpu_moe=args.n_cpu_moe,
        kernels=default_kernels(device, args.kernels), miss_policy=args.miss_policy,
        replay_routing=args.replay_routing, profile=args.profile, llama_cpp_repack=not args.llama_cpp_no_repack)
    names = ["moestream", "llama_cpp"] if args.vs_llama_cpp else ["moestream"]
    results = run_bench(config, names, args.repeat, args.warmup, seed=args.seed, progress=not args.json)
    summaries = {name: summarize(runs) for name, runs in results.items()}
    if args.json:
        report = {name: {**summaries[name], "runs": [asdict(r) for r in runs]} for name, runs in results.items()}
        print(json.dumps({**report, "config": asdict(config)}))
    else:
        print(f"{config.model}: {config.prompt_tokens} prompt + {config.gen_tokens} generated tokens, "
              f"{config.threads} threads, {config.device}, median of {args.repeat}")
        print(format_table(summaries))
        if args.profile:
            print(f"\nmoestream, mean of {args.repeat} (`--profile`: time exclusive of the parts nested inside)")
            print(format_breakdown(summaries["moestream"]["decode_profile_ms"]))
    return 0
