"""`moestream serve --demo`: a small synthetic OLMoE-like model, written on the fly.

Random Q4_K_M weights (its text is gibberish), a byte-level BPE vocab and a ChatML
template, so a machine without a model can try the API and the dashboards. Written once
into the user's cache by tools.synth, keyed by the sources that make it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from moestream.tools import gguf_write, synth
from moestream.tools.synth import Preset, write_synthetic

DEMO_MODEL_NAME = "moestream-demo"
DEMO_QUANT = "Q4_K_M"
# Small enough to write in a second and run on a laptop CPU; enough experts per layer that
# an expert cache below the total shows hits, misses and evictions.
DEMO_PRESET = Preset(arch="olmoe", model="moestream demo (synthetic, random weights)", n_layers=4,
                     n_embd=256, n_head=4, n_head_kv=4, head_dim=64, n_vocab=1024, n_ctx=2048,
                     n_expert=16, n_expert_used=2, n_ff=256, n_ff_exp=None, rope_base=10000.0,
                     rms_eps=1e-5, qk_norm="full")


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "moestream" / "demo"


def demo_model_path(cache_dir: Path | None = None) -> Path:
    """The demo GGUF, written first if missing (~1 s, a few MB)."""
    sources = b"".join(Path(m.__file__).read_bytes() for m in (synth, gguf_write)) + Path(__file__).read_bytes()
    digest = hashlib.sha256(sources).hexdigest()[:12]
    path = (cache_dir or _cache_dir()) / f"{DEMO_MODEL_NAME}-{digest}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # A unique temporary name, then a rename: concurrent starts never read half a file.
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        write_synthetic(tmp, DEMO_PRESET, DEMO_QUANT, progress=False)
        tmp.rename(path)
    return path


def demo_max_cached_experts() -> int:
    """Half the experts: with no VRAM budget to size it, this still makes the cache work."""
    return DEMO_PRESET.n_layers * DEMO_PRESET.n_expert // 2
