"""Where a qwen35moe decode step spends its time: `python -m bench.qwen35_decode_split`.

Builds (once, under --dir) a random-weight Qwen3_5MoeForCausalLM with Qwen3.6-35B-A3B's
per-layer shapes (hidden 2048; 16 heads of 256, 2 KV heads; DeltaNet 16 k-heads and 32
v-heads of 128, conv kernel 4; experts of width 512 and a 512-wide shared expert, 8 used
per token) but 4 layers (3 DeltaNet + 1 attention, the real 3:1 ratio) and --experts
experts per layer, converts it with llama.cpp's converter and quantizes it to Q4_K_M with
llama.cpp. Then decodes --tokens tokens on the CPU (q8 kernels) and prints, per token, the
time of the DeltaNet recurrence (convolution + state update), the DeltaNet projections
and norms, the gated attention, and the MoE layer (router, routed and shared experts),
with the routed experts' quantized bytes per token. On a shared machine other work skews
wall-clock figures (two torch threads on a busy 2-core box wait on each other at every
parallel op: a 2 MB multiply measured 18 ms instead of 0.05 ms), so times are this
thread's CPU time (time.thread_time) with --threads 1 by default: per-core figures.
"""

import argparse
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
import transformers

from moestream.engine import Engine, SamplingParams
from tests.fixtures.hf_tokenizer import save_tiny_tokenizer
from tests.fixtures.llama_convert import convert_hf_dir
from tests.fixtures.quantize import quantize_gguf

VOCAB = 2048


def build(dir_: Path, n_experts: int) -> Path:
    gguf_path = dir_ / f"qwen36-shapes-{n_experts}e-Q4_K_M.gguf"
    if gguf_path.exists():
        return gguf_path
    config = transformers.Qwen3_5MoeTextConfig(
        vocab_size=VOCAB, hidden_size=2048, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=2,
        head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
        linear_value_head_dim=128, linear_conv_kernel_dim=4, moe_intermediate_size=512,
        shared_expert_intermediate_size=512, num_experts=n_experts, num_experts_per_tok=8,
        layer_types=["linear_attention"] * 3 + ["full_attention"], max_position_embeddings=4096,
        bos_token_id=VOCAB - 3, eos_token_id=VOCAB - 1,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                         "mrope_section": [11, 11, 10], "mrope_interleaved": True})
    hf_dir = dir_ / f"hf-{n_experts}e"
    transformers.Qwen3_5MoeForCausalLM(config).save_pretrained(hf_dir)
    save_tiny_tokenizer(VOCAB, hf_dir)
    f32 = dir_ / "F32.gguf"
    convert_hf_dir(hf_dir, f32, "qwen35", ("--no-mtp",))
    quantize_gguf(f32, gguf_path, "Q4_K_M")
    f32.unlink()
    return gguf_path


def timed(totals: dict, name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.thread_time()
        out = fn(*args, **kwargs)
        totals[name] += time.thread_time() - start
        return out
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=os.path.expanduser("~/.cache/moestream/bench-qwen35"))
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = build(Path(args.dir).expanduser(), args.experts)
    engine = Engine.from_gguf(path, kernel_backend="q8")
    model, totals = engine.model, defaultdict(float)
    for name in ("_deltanet_step", "_deltanet", "_gated_attention", "_moe"):
        setattr(model, name, timed(totals, name, getattr(model, name)))
    prompt = list(range(16))
    seq = engine.add_request(prompt, SamplingParams(max_tokens=args.tokens + 1, temperature=0.0, ignore_eos=True))
    engine.step()  # the prefill, not counted
    totals.clear()
    start = time.thread_time()
    while not seq.is_finished:
        engine.step()
    n, step_s = args.tokens, time.thread_time() - start
    lay = engine.experts.layout(0)
    expert_bytes = engine.config.n_layers * engine.config.n_experts_used * lay.expert_bytes
    print(f"load average {os.getloadavg()[0]:.1f}; {args.threads} thread(s); {n} decode tokens, {path.name}")
    rows = [("DeltaNet recurrence (conv + state)", totals["_deltanet_step"]),
            ("DeltaNet projections + norm", totals["_deltanet"] - totals["_deltanet_step"]),
            ("gated attention", totals["_gated_attention"]),
            ("MoE (router, routed + shared experts)", totals["_moe"]),
            ("whole step", step_s)]
    for label, seconds in rows:
        print(f"{label:40s} {seconds / n * 1e3:8.2f} ms/token")
    print(f"routed expert bytes per token {expert_bytes / 2**20:.1f} MiB "
          f"({expert_bytes / (totals['_moe'] / n) / 1e9:.1f} GB/s over the MoE time)")


if __name__ == "__main__":
    main()
