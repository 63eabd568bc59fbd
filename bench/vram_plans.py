"""The VRAM plans of docs/VRAM-PLANS.md: for each full-size synth preset, a header-only file
(`moestream synth --no-weights`, no disk used) and `moestream inspect --plan-for cuda --json`
at each budget, printed as a Markdown table. Runs on any machine, no GPU needed.

    python bench/vram_plans.py --dir /tmp/vram-plans [--quant Q4_K_M] [--ctx-size 4096] [--max-batch 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PRESETS = (("olmoe", "olmoe-1b-7b"), ("qwen2moe", "qwen1.5-moe-a2.7b"), ("qwen3moe", "qwen3-30b-a3b"),
           ("llama", "mixtral-8x7b"), ("deepseek2", "deepseek-v2-lite"))
BUDGETS = ("1GiB", "2GiB", "4GiB", "8GiB")
MiB = 2**20


def moestream(*args: str) -> str:
    cmd = [sys.executable, "-m", "moestream.server.cli", "--log-level", "WARNING", *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def row(preset: str, budget: str, plan: dict) -> str:
    def mib(key: str) -> str:
        return f"{plan[key] / MiB:.0f}"

    return (f"| {preset} | {budget} | {mib('resident_bytes')} | {mib('kv_bytes')} | {mib('workspace_bytes')} "
            f"| {plan['slot_bytes'] / MiB:.2f} | {plan['n_slots']} of {plan['n_experts_total']} "
            f"| {mib('used_bytes')} | {mib('min_budget_bytes')} | {plan['pinned_host_bytes'] / 2**30:.2f} "
            f"| {'yes' if plan['fits'] else 'no'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, type=Path, help="where the header-only files go")
    parser.add_argument("--quant", default="Q4_K_M")
    parser.add_argument("--ctx-size", default="4096")
    parser.add_argument("--max-batch", default="1")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    print("| model | budget | resident MiB | KV MiB | workspace MiB | slot MiB | expert slots | used MiB "
          "| minimum MiB | pinned host GiB | fits |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for arch, preset in PRESETS:
        path = args.dir / f"{preset}-{args.quant}.gguf"
        moestream("synth", "--arch", arch, "--preset", preset, "--quant", args.quant, "-o", str(path),
                  "--no-weights")
        for budget in BUDGETS:
            plan = json.loads(moestream("inspect", str(path), "--vram-budget", budget, "--ctx-size", args.ctx_size,
                                        "--max-batch", args.max_batch, "--plan-for", "cuda", "--json"))
            print(row(preset, budget, plan), flush=True)


if __name__ == "__main__":
    main()
