"""The VRAM plans of docs/VRAM-PLANS.md: for each full-size synth preset, a header-only file
(`moestream synth --no-weights`, no disk used) and `moestream inspect --plan-for cuda --json`
at each budget, printed as a Markdown table. Runs on any machine, no GPU needed.

    python bench/vram_plans.py --dir /tmp/vram-plans [--quant Q4_K_M] [--ctx-size 4096] [--max-batch 1]
    python bench/vram_plans.py --dir /tmp/vram-plans --hybrid [--budgets 8GiB]

--hybrid plans the hybrid presets instead (Gated DeltaNet + attention: qwen35moe), each in
the quant its published files use, with the per-sequence recurrent state as its own column.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PRESETS = (("olmoe", "olmoe-1b-7b"), ("qwen2moe", "qwen1.5-moe-a2.7b"), ("qwen3moe", "qwen3-30b-a3b"),
           ("llama", "mixtral-8x7b"), ("deepseek2", "deepseek-v2-lite"))
HYBRID_PRESETS = (("qwen35moe", "qwen3.6-35b-a3b", "Q4_K_M"), ("qwen35moe", "qwen3.5-122b-a10b", "IQ3_XXS"),
                  ("qwen35moe", "qwen3.5-122b-a10b", "Q4_K_M"))
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


def hybrid_row(preset: str, quant: str, budget: str, plan: dict) -> str:
    return (f"| {preset} | {quant} | {budget} | {plan['resident_bytes'] / MiB:.0f} | {plan['kv_bytes'] / MiB:.0f} "
            f"| {plan['state_bytes'] / MiB:.0f} | {plan['workspace_bytes'] / MiB:.0f} | {plan['slot_bytes'] / MiB:.2f} "
            f"| {plan['n_slots']} of {plan['n_experts_total']} | {plan['used_bytes'] / MiB:.0f} "
            f"| {plan['min_budget_bytes'] / MiB:.0f} | {plan['pinned_host_bytes'] / 2**30:.2f} "
            f"| {'yes' if plan['fits'] else 'no'} |")


def plan_json(path: Path, budget: str, args: argparse.Namespace) -> dict:
    return json.loads(moestream("inspect", str(path), "--vram-budget", budget, "--ctx-size", args.ctx_size,
                                "--max-batch", args.max_batch, "--plan-for", "cuda", "--json"))


def hybrid_main(args: argparse.Namespace) -> None:
    print("| model | quant | budget | resident MiB | KV MiB | state MiB | workspace MiB | slot MiB | expert slots "
          "| used MiB | minimum MiB | pinned host GiB | fits |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for arch, preset, quant in HYBRID_PRESETS:
        path = args.dir / f"{preset}-{quant}.gguf"
        moestream("synth", "--arch", arch, "--preset", preset, "--quant", quant, "-o", str(path), "--no-weights")
        for budget in args.budgets:
            print(hybrid_row(preset, quant, budget, plan_json(path, budget, args)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, type=Path, help="where the header-only files go")
    parser.add_argument("--quant", default="Q4_K_M")
    parser.add_argument("--ctx-size", default="4096")
    parser.add_argument("--max-batch", default="1")
    parser.add_argument("--hybrid", action="store_true", help="plan the hybrid presets (HYBRID_PRESETS)")
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS))
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.hybrid:
        hybrid_main(args)
        return
    print("| model | budget | resident MiB | KV MiB | workspace MiB | slot MiB | expert slots | used MiB "
          "| minimum MiB | pinned host GiB | fits |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for arch, preset in PRESETS:
        path = args.dir / f"{preset}-{args.quant}.gguf"
        moestream("synth", "--arch", arch, "--preset", preset, "--quant", args.quant, "-o", str(path),
                  "--no-weights")
        for budget in args.budgets:
            print(row(preset, budget, plan_json(path, budget, args)), flush=True)


if __name__ == "__main__":
    main()
