"""The device expert cache: fixed slots, LRU across all layers, copies from the host store.

`plan` first splits a layer's experts between the device (hits, and the misses worth a copy)
and the CPU (misses computed from host memory, see offload/hybrid.py); `load` then yields the
device experts, those already on the device first so they compute while the missing ones copy
(mixtral-offloading's `load(unordered=True)`). A slot handed out by a load is locked until the
consumer resumes the generator; when a layer needs more experts than there are slots, the
misses stream through the unlocked slots in waves instead of failing.
"""

from collections import OrderedDict, deque
from contextlib import contextmanager
from collections.abc import Iterator, Mapping, Sequence
from time import perf_counter

import torch

from moestream.offload.copier import LinkCopier, StreamCopier, SyncCopier, make_copier
from moestream.offload.hybrid import MissPolicy, Rates, RunningRate, split_misses
from moestream.offload.layout import ExpertWeights
from moestream.offload.source import LayerPlan
from moestream.offload.stats import CacheStats
from moestream.offload.store import HostExpertStore

Key = tuple[int, int]  # (layer, expert)


class ExpertCache:
    """ExpertSource holding at most `n_slots` experts on `device`; the rest stay in `store`."""

    def __init__(self, store: HostExpertStore, n_slots: int, device: torch.device | str,
                 policy: MissPolicy | str = MissPolicy.COPY, rates: Rates | None = None,
                 copier: SyncCopier | StreamCopier | LinkCopier | None = None):
        if n_slots < 1:
            raise ValueError(f"an expert cache needs at least one slot, got {n_slots}")
        self.policy = MissPolicy.parse(policy)
        if self.policy is MissPolicy.AUTO and rates is None:
            raise ValueError("the auto miss policy needs measured rates (engine.calibrate)")
        self.rates = rates
        self.store = store
        self.device = torch.device(device)
        self.n_slots = n_slots
        self.slot_bytes = store.max_expert_bytes
        self.buffer = torch.empty((n_slots, self.slot_bytes), dtype=torch.uint8, device=self.device)
        self._slots: OrderedDict[Key, int] = OrderedDict()  # least recently used first
        self._free = list(range(n_slots - 1, -1, -1))
        self._locked: set[int] = set()  # slots handed out by the active load
        self._prefetched: set[Key] = set()  # filled by prefetch, not yet looked up
        self._is_loading = False
        self._copier = copier or make_copier(self.device, n_slots)
        self._stats = CacheStats()
        n_total = store.n_layers * store.n_experts
        self._hit_rate = RunningRate(min(1.0, n_slots / n_total))  # p_reuse; uniform prior
        self._link_queue_s = 0.0  # prefetch copies issued since the last plan (async copiers)
        if self.policy is not MissPolicy.COPY:
            self._fill_fixed_set()

    def _fill_fixed_set(self) -> None:
        """Fill every slot at start, last layers first, as llama.cpp's --n-cpu-moe keeps the
        experts of the last layers on the GPU. Under the CPU policy nothing is ever evicted;
        under auto the slots start useful instead of empty when few misses are worth a copy."""
        keys = [(layer, e) for layer in reversed(self.store.layers) for e in range(self.store.n_experts)]
        for key in keys[:self.n_slots]:
            self._fill(key, self._free.pop())  # counted in bytes_to_device and copy_s like any copy

    def shrink(self, n_slots: int) -> None:
        """Keep `n_slots` slots (between steps: a measurement found the device over budget).
        The old buffer is freed before the smaller one is allocated, so the cache starts
        cold; the fixed-set policies fill it again."""
        if not 1 <= n_slots <= self.n_slots:
            raise ValueError(f"shrink to 1..{self.n_slots} slots, got {n_slots}")
        if self._is_loading:
            raise RuntimeError("ExpertCache: shrink between steps, not during a load")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no copy may still write the old buffer
        self.buffer = torch.empty(0, dtype=torch.uint8, device=self.device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the freed bytes back to the device
        self.n_slots = n_slots
        self.buffer = torch.empty((n_slots, self.slot_bytes), dtype=torch.uint8, device=self.device)
        self._slots.clear()
        self._prefetched.clear()
        self._free = list(range(n_slots - 1, -1, -1))
        if self.policy is not MissPolicy.COPY:
            self._fill_fixed_set()

    def cached(self) -> list[Key]:
        """Keys on the device, least recently used first."""
        return list(self._slots)

    def plan(self, layer: int, tokens: Mapping[int, int]) -> LayerPlan:
        """Split {expert: tokens routed to it} of one layer step into device and CPU work."""
        hits = [e for e in tokens if (layer, e) in self._slots]
        misses = {e: n for e, n in tokens.items() if (layer, e) not in self._slots}
        if self.policy is MissPolicy.COPY or not misses:
            on_cpu: tuple[int, ...] = ()
        elif self.policy is MissPolicy.CPU:
            on_cpu = tuple(misses)
        else:
            split = split_misses(misses, self.store.layout(layer).expert_bytes, self.rates,
                                 n_hits=len(hits), free_slots=self.n_slots - len(hits),
                                 p_reuse=self._hit_rate.value, link_busy_s=self._link_queue_s)
            on_cpu = split.cpu
        self._hit_rate.update(len(hits) / len(tokens) if tokens else 0.0)
        self._link_queue_s = 0.0
        if on_cpu:
            self._stats.add(layer, expert_lookups=len(on_cpu), expert_misses=len(on_cpu),
                            misses_on_cpu=len(on_cpu))
        cpu_set = set(on_cpu)
        return LayerPlan(device=tuple(e for e in tokens if e not in cpu_set),
                         cpu=tuple((e, self.store.weights(layer, e)) for e in on_cpu))

    def record_cpu(self, layer: int, tokens: Mapping[int, int], seconds: float) -> None:
        """The CPU side of a step took `seconds` for these experts: count it, correct the model."""
        self._stats.add(layer, cpu_compute_s=seconds)
        if self.rates is not None and tokens:
            nbytes = self.store.layout(layer).expert_bytes
            predicted = sum(self.rates.cpu_s(nbytes, n) for n in tokens.values())
            self.rates.correct_cpu(predicted, seconds)

    @contextmanager
    def _loading(self) -> Iterator[None]:
        """One load at a time; whatever it left locked is released when it ends or is closed."""
        if self._is_loading:
            raise RuntimeError("ExpertCache: finish or close the previous load first")
        self._is_loading = True
        try:
            yield
        finally:
            for slot in self._locked:
                self._copier.release(slot)
            self._locked.clear()
            self._is_loading = False

    def load(self, layer: int, expert_ids: Sequence[int]) -> Iterator[tuple[int, ExpertWeights]]:
        with self._loading():
            yield from self._load(layer, list(dict.fromkeys(int(e) for e in expert_ids)))

    def _lookup(self, layer: int, ids: list[int]) -> tuple[list[tuple[int, int]], deque[int]]:
        """Start a load: (expert, slot) of the hits, locked and touched, and the misses to copy."""
        self._collect_stalls()
        hits = [(e, self._use_hit((layer, e))) for e in ids if (layer, e) in self._slots]
        pending = deque(e for e in ids if (layer, e) not in self._slots)
        self._stats.add(layer, expert_lookups=len(ids), expert_hits=len(hits),
                        expert_misses=len(pending), misses_copied=len(pending))
        return hits, pending

    def _load(self, layer: int, ids: list[int]) -> Iterator[tuple[int, ExpertWeights]]:
        hits, pending = self._lookup(layer, ids)
        ready = deque(hits)  # (expert, slot) in yield order: hits first
        layout = self.store.layout(layer)
        self._issue(layer, pending, ready)
        while ready:
            expert, slot = ready.popleft()
            self._copier.wait(slot, layer)
            yield expert, ExpertWeights.from_blob(layout, self.buffer[slot])
            self._copier.release(slot)
            self._locked.discard(slot)
            self._issue(layer, pending, ready)

    def load_groups(self, layer: int, expert_ids: Sequence[int]) -> Iterator[list[tuple[int, int]]]:
        """Yield (expert, slot) groups of this layer's experts, their bytes in `buffer[slot]`:
        first the hits, then each wave of copies (the first wave copies while the hits
        compute). A group's slots stay locked until the generator is resumed, so one grouped
        kernel can read them all (kernels.moe_ffn)."""
        with self._loading():
            yield from self._load_groups(layer, list(dict.fromkeys(int(e) for e in expert_ids)))

    def _load_groups(self, layer: int, ids: list[int]) -> Iterator[list[tuple[int, int]]]:
        group, pending = self._lookup(layer, ids)
        wave: deque[tuple[int, int]] = deque()
        self._issue(layer, pending, wave)  # the first copies run while the hits compute
        while group or wave:
            if group:
                for _, slot in group:
                    self._copier.wait(slot, layer)
                yield group
                for _, slot in group:
                    self._copier.release(slot)
                    self._locked.discard(slot)
            # the next wave starts copying into the slots just freed while this one computes
            group, wave = list(wave), deque()
            self._issue(layer, pending, wave)

    def _use_hit(self, key: Key) -> int:
        self._slots.move_to_end(key)
        slot = self._slots[key]
        self._locked.add(slot)
        if key in self._prefetched:
            self._prefetched.discard(key)
            self._stats.add(key[0], prefetch_used=1)
        return slot

    def _issue(self, layer: int, pending: deque[int], ready: deque[tuple[int, int]]) -> None:
        """Start copies for pending misses into every slot that can be claimed now."""
        while pending and (slot := self._claim_slot(self._locked)) is not None:
            expert = pending.popleft()
            seconds = self._fill((layer, expert), slot)
            if not self._copier.is_async:  # compute waited for the whole copy
                self._stats.add(layer, stall_s=seconds)
            self._locked.add(slot)
            ready.append((expert, slot))

    def prefetch(self, layer: int, expert_ids: Sequence[int]) -> None:
        """Start copies for experts a coming layer is predicted to use, evicting only unlocked
        slots that hold none of them; stops quietly when no slot can be claimed. The CPU policy
        keeps its fixed set and does not prefetch."""
        if self.policy is MissPolicy.CPU:
            return
        kept = set(self._locked)
        for expert in dict.fromkeys(int(e) for e in expert_ids):
            key = (layer, expert)
            if key in self._slots:
                self._slots.move_to_end(key)  # predicted soon: protect it from eviction
                kept.add(self._slots[key])
                continue
            slot = self._claim_slot(kept)
            if slot is None:
                return
            self._fill(key, slot)
            if self._copier.is_async and self.rates is not None:
                self._link_queue_s += self.rates.copy_s(self.store.layout(layer).expert_bytes)
            self._prefetched.add(key)
            self._stats.add(layer, prefetch_issued=1)
            kept.add(slot)

    def _claim_slot(self, kept: set[int]) -> int | None:
        """A free slot, else the least recently used slot not in `kept` (evicted); else None."""
        if self._free:
            return self._free.pop()
        victim = next((key for key, slot in self._slots.items() if slot not in kept), None)
        if victim is None:
            return None
        self._prefetched.discard(victim)
        self._stats.add(victim[0], expert_evictions=1)
        return self._slots.pop(victim)

    def _fill(self, key: Key, slot: int) -> float:
        """Copy `key`'s bytes into `slot` and make it most recently used; returns copy seconds."""
        start = perf_counter()
        self._copier.copy(slot, self.buffer[slot], self.store.blob_parts(*key), key[0])
        seconds = perf_counter() - start
        self._slots[key] = slot
        self._stats.add(key[0], bytes_to_device=self.store.layout(key[0]).expert_bytes)
        return seconds

    def _collect_stalls(self) -> None:
        """Read back the copier's finished timings: compute waits, and time on the link."""
        for layer, seconds in self._copier.collect_stalls():
            self._stats.add(layer, stall_s=seconds)
        for layer, seconds in self._copier.collect_copies():
            self._stats.add(layer, copy_s=seconds)

    def stats(self) -> dict:
        self._collect_stalls()
        return {**self._stats.as_dict(n_slots=self.n_slots, slot_bytes=self.slot_bytes),
                "miss_policy": self.policy.value}
