"""Expert-cache hit rate with and without next-layer prefetch, and how many prefetched
experts were used, on one model with a quarter of its experts cached.

    python -m bench.prefetch_accuracy /tmp/synth/olmoe-1b-7b-Q4_K_M.gguf
"""

from __future__ import annotations

import argparse

import numpy as np

from moestream.engine import Engine, SamplingParams
from moestream.engine.loader import open_gguf


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--cache-share", type=float, default=0.25, help="share of all experts cached")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--gen-tokens", type=int, default=32)
    args = p.parse_args(argv)
    config = open_gguf(args.model).config
    slots = max(1, int(args.cache_share * config.n_layers * config.n_experts))
    for prefetch in (False, True):
        engine = Engine.from_gguf(args.model, max_cached_experts=slots, prefetch=prefetch,
                                  kernel_backend="q8", max_batch=1,
                                  ctx_size=args.prompt_tokens + args.gen_tokens + 1)
        prompt = np.random.default_rng(0).integers(300, engine.config.vocab_size, args.prompt_tokens)
        params = SamplingParams(max_tokens=args.gen_tokens, temperature=0, ignore_eos=True)
        list(engine.generate(prompt.tolist(), params))
        s = engine.stats()
        lookups = s["expert_hits"] + s["expert_misses"]
        used = s["prefetch_used"] / s["prefetch_issued"] if s["prefetch_issued"] else 0.0
        print(f"prefetch={'on' if prefetch else 'off'} slots={slots}: hits {s['expert_hits']} misses "
              f"{s['expert_misses']} hit rate {s['expert_hits'] / lookups:.3f} prefetch issued "
              f"{s['prefetch_issued']} used {s['prefetch_used']} ({used:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
