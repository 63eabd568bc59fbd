"""Decode speed and expert-cache behaviour of one model under several VRAM budgets.

    python -m bench.offload_sweep --model /tmp/olmoe-1b-7b-Q4_K_M.gguf --budgets 1GiB,2GiB,4GiB,8GiB

Prints, per budget and miss policy (copy / cpu / auto, offload/hybrid.py): decode and prefill
tok/s, expert hit rate, the share of misses computed on the CPU, host->device GB/s of the
expert copies beside the measured pinned host->device bandwidth, and peak VRAM against the
budget. On a machine without CUDA the "device" is host memory (copies are memcpy, or paced by
--simulate-link-gbps), so the table tests the policies' plumbing, not a GPU's speed.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from moestream.tools.bench import run_bench, summarize
from moestream.tools.measure import BenchConfig
from moestream.offload.planner import format_bytes, parse_bytes


def pinned_h2d_gb_s(nbytes: int = 256 << 20, repeat: int = 5) -> float | None:
    """The copy rate the expert cache can hope for: pinned host -> device, one big copy."""
    if not torch.cuda.is_available():
        return None
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return nbytes * repeat / (time.perf_counter() - start) / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", "-m", required=True)
    p.add_argument("--budgets", default="1GiB,2GiB,4GiB,8GiB")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--kernels", default="auto")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--policies", default="copy,cpu,auto",
                   help="miss policies to compare at each budget (see `moestream serve --help`)")
    p.add_argument("--max-cached-experts", type=int, default=None,
                   help="cap the slots below what each budget buys (on the CPU: the cache size)")
    p.add_argument("--simulate-link-gbps", type=float, default=None,
                   help="CPU only: put the cache's 'device' behind a simulated link this fast")
    p.add_argument("--replay-routing", default=None, metavar="LOG",
                   help="route from this real routing log instead of the (random-weight) router")
    p.add_argument("--json", metavar="PATH", help="also write every row (and the pinned H2D rate) here")
    args = p.parse_args(argv)
    peak = pinned_h2d_gb_s()
    print(f"pinned host->device: {f'{peak:.1f} GB/s' if peak else 'n/a (no CUDA)'}"
          + (f"; simulated link {args.simulate_link_gbps} GB/s" if args.simulate_link_gbps else ""))
    print(f"{'budget':>10} {'policy':>6} {'decode tok/s':>13} {'prefill tok/s':>14} {'hit rate':>9} "
          f"{'misses on CPU':>14} {'H2D GB/s':>9} {'peak VRAM':>11} {'reserved':>11} {'fits':>5}")
    rows = []
    for budget in args.budgets.split(","):
        for policy in args.policies.split(","):
            config = BenchConfig(model=args.model, device=args.device, vram_budget=budget,
                                 max_cached_experts=args.max_cached_experts, threads=os.cpu_count() or 1,
                                 prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                                 n_cpu_moe=None, kernels=args.kernels, miss_policy=policy,
                                 simulate_link_gbps=args.simulate_link_gbps,
                                 replay_routing=args.replay_routing)
            s = summarize(run_bench(config, ["moestream"], args.repeat, warmup=1, progress=False)["moestream"])
            vram, reserved = s["peak_vram_bytes"] or 0, s["peak_reserved_vram_bytes"] or 0
            fits = "yes" if max(vram, reserved) <= parse_bytes(budget) else "NO"
            print(f"{budget:>10} {policy:>6} {s['decode_tok_s']:>13.2f} {s['prefill_tok_s']:>14.2f} "
                  f"{_cell(s['expert_hit_rate']):>9} {_cell(s['cpu_miss_share']):>14} {_cell(s['h2d_gb_s'], 2):>9} "
                  f"{format_bytes(vram):>11} {format_bytes(reserved):>11} {fits:>5}", flush=True)
            rows.append({"budget": budget, "budget_bytes": parse_bytes(budget), "policy": policy, **s})
            if args.json:  # after each row: a run stopped at a time limit keeps what it measured
                with open(args.json, "w") as f:
                    json.dump({"pinned_h2d_gb_s": peak, "simulated_link_gbps": args.simulate_link_gbps,
                               "replay_routing": args.replay_routing, "rows": rows}, f, indent=1)
    return 0


def _cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    raise SystemExit(main())
