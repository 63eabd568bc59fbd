"""Engine layer: GGUF loading, tokenizer, MoE forward, KV cache, sampler, scheduler."""

from moestream.engine.engine import Engine, EngineConfig, QueueFull
from moestream.engine.sequence import SamplingParams, StepOutput

__all__ = ["Engine", "EngineConfig", "QueueFull", "SamplingParams", "StepOutput"]
