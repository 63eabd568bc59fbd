"""`moestream serve --demo`: a small synthetic OLMoE-like model, written on the fly.

Random weights (its text is gibberish) with quantized Q8_0 experts and a byte-level BPE
vocab with a ChatML template, so a machine without a model can try the API and the
dashboards. Written once into the user's cache, keyed by the sources that make it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import gguf
import numpy as np

from engine import gguf_write
from engine.gguf_write import ModelMetadata, QuantizedTensor, byte_level_bpe_vocab, write_gguf

DEMO_MODEL_NAME = "moestream-demo"
DEMO_META = ModelMetadata(
    arch="olmoe", name=DEMO_MODEL_NAME, n_layers=4, n_embd=256, n_ff=256, n_head=4, n_head_kv=4,
    head_dim=64, n_ctx=2048, rope_freq_base=10000.0, rms_eps=1e-5, n_expert=16, n_expert_used=2,
    file_type=gguf.LlamaFileType.MOSTLY_Q8_0,
)
DEMO_VOCAB_SIZE = 1024
# Weights ~ N(0, 0.1) keep the logits spread over several units, so the text varies.
_WEIGHT_STD = 0.1
_SEED = 0


def demo_tensors(meta: ModelMetadata, n_vocab: int, seed: int) -> dict[str, gguf_write.TensorData]:
    """llama.cpp-named tensors (numpy shapes: GGUF dims reversed) of an olmoe model."""
    rng = np.random.default_rng(seed)
    d, q, kv = meta.n_embd, meta.n_head * meta.head_dim, meta.n_head_kv * meta.head_dim

    def weight(*shape: int) -> np.ndarray:
        return (_WEIGHT_STD * rng.standard_normal(shape)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)

    def experts(*shape: int) -> QuantizedTensor:
        quant = gguf.GGMLQuantizationType.Q8_0
        return QuantizedTensor(gguf.quants.quantize(weight(*shape), quant), quant)

    tensors: dict[str, gguf_write.TensorData] = {
        "token_embd.weight": weight(n_vocab, d), "output_norm.weight": norm(d),
        "output.weight": weight(n_vocab, d),
    }
    e, f = meta.n_expert, meta.n_ff
    for i in range(meta.n_layers):
        tensors.update({
            f"blk.{i}.attn_norm.weight": norm(d), f"blk.{i}.attn_q.weight": weight(q, d),
            f"blk.{i}.attn_k.weight": weight(kv, d), f"blk.{i}.attn_v.weight": weight(kv, d),
            f"blk.{i}.attn_output.weight": weight(d, q), f"blk.{i}.attn_q_norm.weight": norm(q),
            f"blk.{i}.attn_k_norm.weight": norm(kv), f"blk.{i}.ffn_norm.weight": norm(d),
            f"blk.{i}.ffn_gate_inp.weight": weight(e, d),
            f"blk.{i}.ffn_gate_exps.weight": experts(e, f, d),
            f"blk.{i}.ffn_up_exps.weight": experts(e, f, d),
            f"blk.{i}.ffn_down_exps.weight": experts(e, d, f),
        })
    return tensors


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "moestream" / "demo"


def demo_model_path(cache_dir: Path | None = None) -> Path:
    """The demo GGUF, written if missing (a few seconds, ~20 MB)."""
    digest = hashlib.sha256(Path(__file__).read_bytes() + Path(gguf_write.__file__).read_bytes())
    path = (cache_dir or _cache_dir()) / f"{DEMO_MODEL_NAME}-{digest.hexdigest()[:12]}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written under a unique temporary name, then renamed: concurrent starts never
        # see a half-written file.
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        write_gguf(tmp, DEMO_META, demo_tensors(DEMO_META, DEMO_VOCAB_SIZE, _SEED),
                   byte_level_bpe_vocab(DEMO_VOCAB_SIZE))
        tmp.rename(path)
    return path
