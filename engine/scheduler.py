"""Who runs next: continuous batching with chunked prefill and admission by KV room.

Every step serves the running decodes first (one token each), then spends what is left
of the token budget on prefill chunks, oldest request first. A request is admitted only
when the KV cache has room for its whole prompt; when a decode cannot grow, the newest
running sequence is preempted (its blocks freed, recomputed later). Hybrid models also
need a recurrent-state slot per admitted sequence, freed with its blocks.

With the prefix cache, an admitted sequence first takes the cached blocks of the longest
run of its full blocks (never its last token, whose logits it must compute) and prefills
only the rest; admission counts those blocks as taken, not as new ones.

The n choices of one request prefill once: the first sequence is scheduled, the others
wait beside it (not in the queue) and fork from it when its prompt is computed, sharing
its full blocks and copying the partial last one (and, on hybrid models, its recurrent
state). A fork with no room then, or whose parent ends first, queues as a request of its own.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from moestream.engine.kv_cache import KVCache
from moestream.engine.recurrent_state import RecurrentStatePool
from moestream.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 8
    max_batched_tokens: int = 256  # prefill chunk budget per step
    max_waiting: int = 64


@dataclass
class ScheduledSeq:
    seq: Sequence
    n_tokens: int


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCache, states: RecurrentStatePool | None = None):
        self.config, self.kv, self.states = config, kv, states
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def can_add(self) -> bool:
        # Room for max_waiting beyond the free batch slots: a burst into an idle engine is
        # admitted whole, not cut at max_waiting before the next step runs any of it.
        free_slots = max(0, self.config.max_num_seqs - len(self.running))
        return len(self.waiting) < self.config.max_waiting + free_slots

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        if seq.parent is not None:
            seq.parent.forks.remove(seq)
            seq.parent = None
        for fork in seq.forks:  # its prefill will not come: each prefills its own
            fork.parent = None
            self.waiting.append(fork)
        seq.forks.clear()
        self._release(seq)
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed, seq.status = 0, SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Give `child` the parent's computed prompt, or queue it when there is no room."""
        parent.forks.remove(child)
        child.parent = None
        n, bs = parent.num_computed, self.kv.block_size
        shared = parent.block_table[:n // bs]
        room = (len(self.running) < self.config.max_num_seqs and self.kv.can_allocate([], n + 1, shared)
                and (self.states is None or self.states.can_allocate()))
        if not room:
            self.waiting.append(child)
            return
        self.kv.allocate(child.block_table, n + 1, shared)
        if n % bs:
            self.kv.copy_block(parent.block_table[n // bs], child.block_table[n // bs])
        if self.states is not None:
            child.state_slot = self.states.allocate()
            self.states.copy(parent.state_slot, child.state_slot)
        child.num_computed, child.num_registered_blocks = n, len(shared)
        child.block_hashes = parent.block_hashes[:len(shared)]
        child.num_cached_tokens = parent.num_cached_tokens
        child.status, child.first_scheduled_s = SequenceStatus.RUNNING, time.monotonic()
        self.running.append(child)

    def _release(self, seq: Sequence) -> None:
        self.kv.free(seq.block_table)
        seq.num_registered_blocks = 0
        if self.states is not None:
            self.states.free(seq.state_slot)
            seq.state_slot = None

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks a (re)starting sequence can take: full blocks before its last token."""
        if not self.kv.blocks.caching:
            return []
        self.kv.blocks.extend_hashes(seq.block_hashes, seq.token_ids, seq.num_tokens - 1)
        return self.kv.blocks.lookup(seq.block_hashes[:(seq.num_tokens - 1) // self.kv.block_size])

    def _can_admit(self, seq: Sequence, hit: list[int]) -> bool:
        if self.states is not None and not self.states.can_allocate():
            return False
        return self.kv.can_allocate(seq.block_table, seq.num_tokens + 1, hit)

    def _admit(self, seq: Sequence, hit: list[int]) -> None:
        self.kv.allocate(seq.block_table, seq.num_tokens + 1, hit)
        seq.num_registered_blocks = len(hit)
        seq.num_computed = len(hit) * self.kv.block_size
        if seq.num_cached_tokens is None:  # first admission: what the request reports
            seq.num_cached_tokens = seq.num_computed
            if self.kv.blocks.caching:
                self.kv.blocks.lookup_tokens += len(seq.prompt_ids)
                self.kv.blocks.hit_tokens += seq.num_computed

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.config.max_batched_tokens
        scheduled: list[ScheduledSeq] = []
        for seq in [s for s in self.running if s.num_computed == s.num_tokens - 1]:
            if seq.status is not SequenceStatus.RUNNING:  # preempted for an older one
                continue
            while not self.kv.can_allocate(seq.block_table, seq.num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                self.kv.allocate(seq.block_table, seq.num_tokens)
                scheduled.append(ScheduledSeq(seq, 1))
                budget -= 1
        for seq in [s for s in self.running if s.num_computed < s.num_tokens - 1]:
            if budget <= 0:
                break
            n = min(budget, seq.num_tokens - seq.num_computed)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            hit = self._cached_prefix(seq)
            if not self._can_admit(seq, hit):
                break
            self.waiting.popleft()
            self._admit(seq, hit)
            if self.states is not None:
                seq.state_slot = self.states.allocate()
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_s is None:
                seq.first_scheduled_s = time.monotonic()
            self.running.append(seq)
            n = min(budget, seq.num_tokens - seq.num_computed)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return scheduled
