"""A server whose model writes scripted text: a tiny random OLMoE with a chosen vocab and chat
template, loaded by the real Engine, whose sampler is replaced by a script (the forward,
the scheduler, detokenization, stop and finish handling are the real ones). It runs in this
process under uvicorn on a free loopback port, so the official openai client talks HTTP to
it; requests whose output a grammar constrains sample for real.

The gpt-oss chat template is the one llama.cpp ships (the llama-cpp-python 0.3.36 sdist,
found as tests/fixtures/llama_convert.py finds it)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import uvicorn

from moestream.engine import Engine
from moestream.engine.engine_config import EngineConfig
from moestream.engine.loader import open_gguf
from moestream.server.app import create_app
from moestream.server.state import ServerSettings
from moestream.tools.gguf_write import (HARMONY_CONTROL_TOKENS, BpeVocab, ModelMetadata, byte_level_bpe_vocab,
                                        write_gguf)
from moestream.tools.synth import Preset, tensor_shapes
from tests.fixtures.llama_convert import _SDIST_ROOT, _cache_dir, _from_ci
from tests.server.conftest import free_port

N_VOCAB = 512
PRESET = Preset(arch="olmoe", model="scripted", n_layers=1, n_embd=64, n_head=2, n_head_kv=2, head_dim=32,
                n_vocab=N_VOCAB, n_ctx=4096, n_expert=4, n_expert_used=2, n_ff=64, n_ff_exp=None,
                rope_base=10000.0, rms_eps=1e-5, qk_norm="full")


def template_dir() -> Path:
    """llama.cpp's copies of chat templates in the sdist (absent until it is unpacked)."""
    return Path(_from_ci() or _cache_dir() / _SDIST_ROOT) / "models" / "templates"


def gpt_oss_template() -> str | None:
    """llama.cpp's copy of gpt-oss's chat template, or None when the sdist is not unpacked."""
    path = template_dir() / "openai-gpt-oss-120b.jinja"
    return path.read_text() if path.is_file() else None


TEMPLATES_ABSENT = "needs llama.cpp's chat templates from the llama-cpp-python 0.3.36 sdist (not unpacked here)"


def harmony_vocab() -> BpeVocab:
    """Byte-level BPE plus harmony's control tokens; generation ends at <|return|>."""
    return byte_level_bpe_vocab(N_VOCAB, HARMONY_CONTROL_TOKENS, "<|return|>")


def write_model(path: Path, vocab: BpeVocab, template: str) -> Path:
    rng = np.random.default_rng(0)
    p = PRESET
    meta = ModelMetadata(arch=p.arch, name=p.model, n_layers=p.n_layers, n_embd=p.n_embd, n_ff=p.n_ff,
                         n_head=p.n_head, n_head_kv=p.n_head_kv, head_dim=p.head_dim, n_ctx=p.n_ctx,
                         rope_freq_base=p.rope_base, rms_eps=p.rms_eps, n_expert=p.n_expert,
                         n_expert_used=p.n_expert_used)
    tensors = {t.name: (1.0 + 0.1 * rng.standard_normal(t.shape) if t.name.endswith("norm.weight")
                        else 0.1 * rng.standard_normal(t.shape)).astype(np.float32)
               for t in tensor_shapes(p)}
    write_gguf(path, meta, tensors, vocab, template)
    return path


class ScriptedEngine(Engine):
    """The Engine, but each sequence's tokens come from the first script whose key is in
    its prompt's last user turn (then an end-of-generation token); a sequence with a grammar
    samples for real."""

    def __init__(self, path: Path, scripts: dict[str, str], end_text: str):
        super().__init__(open_gguf(path), EngineConfig(device="cpu", max_batch=4, ctx_size=2048))
        encode = lambda text: self.tokenizer.encode(text, parse_special=True)  # noqa: E731
        self.scripts = {key: encode(text) + encode(end_text) for key, text in scripts.items()}

    def _sample_each(self, logits, seqs, rows):
        chosen = super()._sample_each(logits, seqs, rows)
        for i, seq in enumerate(seqs):
            if seq.params.grammar is None:
                script = self._script_of(seq.prompt_ids)
                chosen[i] = (script[min(len(seq.output_ids), len(script) - 1)], None)
        return chosen

    def _script_of(self, prompt_ids: list[int]) -> list[int]:
        prompt = self.tokenizer.decode(prompt_ids)
        last_turn = prompt[prompt.rfind("user"):]
        script = next((ids for key, ids in self.scripts.items() if key in last_turn), None)
        if script is None:
            raise KeyError(f"no script's key is in the last user turn {last_turn!r}")
        return script


class InProcessServer:
    def __init__(self, load, reasoning_format: str = "auto"):
        self.port = free_port()
        app = create_app(ServerSettings(served_model_name="scripted", reasoning_format=reasoning_format), load)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> InProcessServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("the in-process server did not become healthy")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=60)
