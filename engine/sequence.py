"""A request's state inside the engine: its tokens, sampling settings and KV blocks."""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from moestream.engine.constraints import Constraint, Grammar
from moestream.kernels.errors import MoestreamError

# Below this a temperature or top_p means greedy (vLLM's _SAMPLING_EPS; llama.cpp treats
# temperatures <= 0 the same way): dividing logits by a temperature of 1e-38 overflows.
SAMPLING_EPS = 1e-5
SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.Generator.manual_seed takes


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the chosen token's; n: plus the top n
    grammar: Grammar | None = None  # the output must match it (masked each step)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), OpenAI's

    def __post_init__(self) -> None:
        finite = all(math.isfinite(v) for v in (self.temperature, self.top_p, self.presence_penalty,
                                                self.frequency_penalty))
        checks = [
            (finite, "temperature, top_p and the penalties must be finite numbers"),
            (self.max_tokens >= 1, "max_tokens must be at least 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0 (0 disables it)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "top_logprobs must be in [0, 20]"),
            (self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
             f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]"),
            (all(-100 <= b <= 100 for _, b in self.logit_bias), "logit_bias values must be in [-100, 100]"),
        ]
        for ok, message in checks:
            if not ok:
                raise MoestreamError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS or self.top_p < SAMPLING_EPS or self.top_k == 1


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    state_slot: int | None = None  # hybrid models: its RecurrentStatePool slot while admitted
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of its full blocks
    num_registered_blocks: int = 0  # leading blocks of block_table in the prefix cache
    num_cached_tokens: int | None = None  # prompt tokens the prefix cache served at admission
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    arrival_s: float = field(default_factory=time.monotonic)
    first_scheduled_s: float | None = None
    generator: torch.Generator = field(init=False)
    constraint: Constraint | None = None  # where the output stands in params.grammar
    # n > 1: the other choices wait for this one's prefill, then fork from its prompt KV
    forks: list[Sequence] = field(default_factory=list)
    parent: Sequence | None = None  # a fork not yet forked: the sequence that prefills for it

    def __post_init__(self) -> None:
        self.generator = torch.Generator()
        seed = self.params.seed if self.params.seed is not None else torch.seed()
        self.generator.manual_seed(seed)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass
class StepOutput:
    seq_id: int
    token_id: int
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "error"
    logprob: TokenLogprob | None = None
    error: str | None = None  # why this sequence alone failed (finish_reason "error")
