"""The Engine: load a GGUF, then `schedule() -> run -> postprocess` one step at a time.

The engine is single-threaded by design: the server drives `step()` from one thread and
hands requests in between steps.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterator

import torch

from moestream.engine.constraints import GrammarCompiler
from moestream.engine.engine_config import KV_DTYPES, EngineConfig
from moestream.engine.header import ModelHeader
from moestream.engine.kv_cache import KVCache
from moestream.engine.loader import GGUFModelFile, open_gguf
from moestream.engine.memory_plan import ACTIVATION_DTYPE, plan_memory
from moestream.engine.model import BatchInput, Segment
from moestream.engine.models import model_class
from moestream.engine.placement import build_expert_source, device_budget
from moestream.engine.recurrent_state import RecurrentStatePool
from moestream.engine.sampler import sample
from moestream.engine.scheduler import Scheduler, SchedulerConfig, ScheduledSeq
from moestream.engine.sequence import SamplingParams, Sequence, StepOutput
from moestream.engine.chat_template import render_chat
from moestream.engine.tokenizer import Tokenizer
from moestream.engine.user_text import UserTextShield, split_rendered
from moestream.kernels.errors import MoestreamError
from moestream.engine.replay import RoutingReplay
from moestream.offload.planner import BudgetTooSmall, format_bytes, slots_after_measurement
from moestream.offload.trace import RoutingRecorder, read_trace

log = logging.getLogger(__name__)

_MEASURED_STEPS = 4  # device memory is measured after load and after each of the first steps


class Engine:
    def __init__(self, file: GGUFModelFile, config: EngineConfig):
        self.file, self.engine_config = file, config
        self.config = file.config
        self.device = torch.device(config.device)
        self.tokenizer = Tokenizer.from_reader(file.reader)
        # One plan from the header before anything is allocated (a CUDA default budget reads
        # free memory that nothing of ours holds yet); then exactly what it says is allocated.
        self.memory = plan_memory(ModelHeader.from_reader(file.reader, str(file.path)), config,
                                  device_budget(config))
        if not self.memory.fits:
            raise BudgetTooSmall(self.memory.advice())
        if config.dense_weights and not self.memory.dense_weights:
            log.warning("dense weights do not fit the budget: resident weights stay quantized")
        self.plan = self.memory if self.memory.has_cache else None
        if self.plan is not None:
            log.info("%s", self.plan)
        self.max_model_len = self.memory.max_model_len
        log.info("allocating the KV cache: %d tokens, %s, %s", self.memory.kv_tokens, config.kv_dtype,
                 format_bytes(self.memory.kv_bytes))
        kv_start_s = time.perf_counter()
        # A hybrid model's recurrent state sums the whole prefix and is not kept per block:
        # KV blocks alone cannot resume it, so it prefills every prompt in full.
        prefix_cache = config.prefix_cache and self.config.linear is None
        if config.prefix_cache and not prefix_cache:
            log.info("prefix cache off: %s keeps a recurrent state that KV blocks cannot restore",
                     self.config.arch)
        self.kv = KVCache(self.config.n_kv_layers, self.config.n_kv_heads, self.config.head_dim,
                          self.memory.kv_tokens // config.kv_block_size, config.kv_block_size,
                          KV_DTYPES[config.kv_dtype], self.device, value_dim=self.config.kv_value_dim,
                          prefix_cache=prefix_cache)
        log.info("KV cache allocated in %.1f s", time.perf_counter() - kv_start_s)
        # hybrid models: one DeltaNet state per sequence that can run at once
        self.states = (RecurrentStatePool(self.config.linear, config.max_batch, self.device)
                       if self.config.linear is not None else None)
        self.experts = build_expert_source(file, config, self.memory)
        self.model = model_class(self.config.arch)(
            file, self.experts, self.device, ACTIVATION_DTYPE, config.kernel_backend,
            prefetch=config.prefetch and self.plan is not None and not config.replay_routing,
            dense_weights=self.memory.dense_weights)
        if self.states is not None:
            self.model.states = self.states
        if config.replay_routing:
            self.model.replay = RoutingReplay(read_trace(config.replay_routing), self.config.n_experts,
                                              self.config.n_experts_used, self.config.n_layers)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_batch, config.max_batched_tokens, config.max_waiting), self.kv, self.states
        )
        self.sequences: dict[int, Sequence] = {}
        self._batch_rows: tuple[list[int], list[int]] = ([], [])  # (seq id, position) per row
        self.recorder: RoutingRecorder | None = None
        if config.record_routing:
            self.recorder = RoutingRecorder(config.record_routing, self.config.n_experts,
                                            self.config.n_layers, self.config.n_experts_used)
            self.model.routing_hook = self._record_routing
        self.chat_template = file.meta.get("tokenizer.chat_template")
        self.grammars = GrammarCompiler(self.tokenizer, self.config.vocab_size)
        self._user_text = UserTextShield(self.tokenizer.special_texts)
        self._steps_to_measure = _MEASURED_STEPS
        self.prompt_tokens_computed = 0  # prompt tokens run through the model (not from the cache)
        self.check_device_memory()

    @classmethod
    def from_gguf(cls, path: str | Path, device: str = "cpu", vram_budget: str | int | None = None,
                  max_cached_experts: int | None = None, **options) -> Engine:
        return cls(open_gguf(path, compute=True), EngineConfig(device=device, vram_budget=vram_budget,
                                                 max_cached_experts=max_cached_experts, **options))

    # -- requests -------------------------------------------------------------------
    def check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise MoestreamError("the prompt is empty: send at least one token")
        if len(prompt_ids) >= self.max_model_len:
            raise PromptTooLong(
                f"the prompt has {len(prompt_ids)} tokens but the context holds {self.max_model_len}: "
                "shorten the prompt or start the server with a larger --ctx-size (and --kv-tokens, "
                "when that was set below it)")
        self._check_vocab(prompt_ids)

    def check_prompt_text(self, text: str) -> None:
        """Refuse a text too long for the context before tokenizing it (which takes seconds
        and holds memory for a text of megabytes): a cheap bound, not a token count."""
        limit = (self.max_model_len - 1) * self.tokenizer.max_chars_per_token
        if len(text) > limit:
            raise PromptTooLong(
                f"the prompt has {len(text)} characters, more than the {self.max_model_len}-token "
                f"context can hold (at most {limit}): shorten the prompt or start the server with a "
                "larger --ctx-size (and --kv-tokens, when that was set below it)")

    def _check_vocab(self, token_ids: list[int]) -> None:
        bad = [t for t in token_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise MoestreamError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")

    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        return self.add_group(prompt_ids, [params])[0]

    def add_group(self, prompt_ids: list[int], params: list[SamplingParams]) -> list[Sequence]:
        """One sequence per settings, all on one prompt (a request's n choices): the prompt is
        prefilled once, by the first, and the others fork from its KV."""
        self.check_prompt(prompt_ids)
        for p in params:
            self._check_vocab([t for t, _ in p.logit_bias])
        if not self.scheduler.can_add():
            raise QueueFull(f"the batch is full and {self.engine_config.max_waiting} requests are "
                            "already waiting; retry later")
        seqs = [Sequence(list(prompt_ids), p) for p in params]
        for seq in seqs:
            if seq.params.grammar is not None:
                seq.constraint = self.grammars.start(seq.params.grammar)
            self.sequences[seq.seq_id] = seq
        first = seqs[0]
        first.forks = seqs[1:]
        for fork in first.forks:
            fork.parent = first
        self.scheduler.add(first)
        return seqs

    def abort(self, seq_id: int) -> None:
        seq = self.sequences.pop(seq_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.finish(seq, "abort")

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # -- one step -------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        batch, sampling, rows = self._build_batch(scheduled)
        logits = self.model.forward(batch, self.kv)
        for item in scheduled:
            seq, start = item.seq, item.seq.num_computed
            seq.num_computed += item.n_tokens
            self.prompt_tokens_computed += max(0, min(seq.num_computed, len(seq.prompt_ids)) - start)
            self._cache_full_blocks(seq)
        chosen = self._sample_each(logits, sampling, rows)
        for seq in sampling:
            if seq.parent is not None:  # its parent's prompt is computed now: share it
                self.scheduler.fork(seq.parent, seq)
        outputs = self._postprocess(sampling, chosen)
        if self._steps_to_measure:
            self._steps_to_measure -= 1
            self.check_device_memory()
        return outputs

    def _cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks this step filled in the prefix cache (prompt and output alike:
        a multi-turn conversation's next prompt repeats the reply)."""
        blocks = self.kv.blocks
        n_full = seq.num_computed // self.kv.block_size
        if blocks.caching and n_full > seq.num_registered_blocks:
            blocks.extend_hashes(seq.block_hashes, seq.token_ids, seq.num_computed)
            blocks.register(seq.block_table, seq.block_hashes, seq.num_registered_blocks, n_full)
            seq.num_registered_blocks = n_full

    def _sample_each(self, logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> list:
        """Each sequence's (token, logprob) drawn from its row of `logits`, or the exception
        its sampling raised: one request's failure ends that request alone, and the others'
        draws are untouched."""
        host_logits = logits.to("cpu", torch.float32)  # one copy per step, not one per sequence
        chosen = []
        for i, seq in zip(rows, seqs):
            try:
                chosen.append(sample(host_logits[i:i + 1], [seq])[0])
            except Exception as exc:
                log.exception("sampling failed for sequence %d; ending it", seq.seq_id)
                chosen.append(exc)
        return chosen

    def _build_batch(self, scheduled: list[ScheduledSeq]) -> tuple[BatchInput, list[Sequence], list[int]]:
        """The batch, the sequences to sample and the logits row each samples from (a
        prompt's last row also serves the forks waiting for it)."""
        tokens, positions, segments, logits_rows, sampling, rows = [], [], [], [], [], []
        row_seqs: list[int] = []
        offset = 0
        for item in scheduled:
            seq, start = item.seq, item.seq.num_computed
            end = start + item.n_tokens
            tokens += seq.token_ids[start:end]
            positions += range(start, end)
            row_seqs += [seq.seq_id] * item.n_tokens
            segments.append(Segment(offset, item.n_tokens, self.kv.index(seq.block_table, start, end),
                                    self.kv.index(seq.block_table, 0, end), seq.state_slot))
            offset += item.n_tokens
            if end == seq.num_tokens:  # the chunk reaches the sequence's last token: sample
                logits_rows.append(offset - 1)
                sampling += [seq, *seq.forks]
                rows += [len(logits_rows) - 1] * (1 + len(seq.forks))
        self._batch_rows = (row_seqs, positions)
        batch = BatchInput(
            token_ids=torch.tensor(tokens, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long, device=self.device),
            segments=segments,
            logits_rows=torch.tensor(logits_rows, dtype=torch.long, device=self.device),
        )
        return batch, sampling, rows

    def _record_routing(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        seq_ids, positions = self._batch_rows
        if len(seq_ids) == len(ids):  # score() runs outside the scheduler: not recorded
            self.recorder.record_batch(seq_ids, positions, layer, ids.tolist(), weights.tolist())

    def _postprocess(self, seqs: list[Sequence], chosen: list) -> list[StepOutput]:
        outputs = []
        for seq, choice in zip(seqs, chosen):
            if isinstance(choice, Exception):
                self.scheduler.finish(seq, "error")
                self.sequences.pop(seq.seq_id, None)
                error = f"{type(choice).__name__}: {choice}"
                outputs.append(StepOutput(seq.seq_id, -1, True, "error", error=error))
                continue
            token, logprob = choice
            seq.output_ids.append(token)
            if seq.constraint is not None and not seq.constraint.accept(token):
                log.warning("sequence %d: the grammar refused the sampled token %d", seq.seq_id, token)
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                self.sequences.pop(seq.seq_id, None)
            outputs.append(StepOutput(seq.seq_id, token, reason is not None, reason, logprob))
        return outputs

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.tokenizer.eos_ids):
            return "stop"
        if seq.constraint is not None and seq.constraint.is_finished:
            return "stop"  # the grammar is complete and allows nothing more
        if len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    # -- conveniences ---------------------------------------------------------------
    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[StepOutput]:
        """Run one request to completion (other queued requests advance too)."""
        seq = self.add_request(prompt_ids, params)
        try:
            while not seq.is_finished:
                for out in self.step():
                    if out.seq_id == seq.seq_id:
                        yield out
        finally:
            self.abort(seq.seq_id)

    def chat_prompt_ids(self, messages: list[dict], **template_vars) -> list[int]:
        """Render messages with the model's chat template and tokenize: the template's markup
        with special tokens parsed, control-token spellings inside the messages as plain text."""
        tok = self.tokenizer
        # the template variables (tools' names and descriptions) are user text as well
        shielded, user_texts = self._user_text.shield([*messages, template_vars])
        *shielded, template_vars = shielded
        text = render_chat(self.chat_template, shielded, add_generation_prompt=True,
                           bos_token=tok.token_text(tok.bos_id) if tok.bos_id is not None else "",
                           eos_token=tok.token_text(tok.eos_id) if tok.eos_id is not None else "",
                           **template_vars)
        self.check_prompt_text(text)
        ids = []
        for piece, is_markup in split_rendered(text, user_texts):
            ids += tok.encode(piece, add_special=False, parse_special=is_markup)
        if tok.add_bos and tok.bos_id is not None and ids[:1] != [tok.bos_id]:
            ids = [tok.bos_id] + ids
        return ids

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [len(token_ids), vocab] (float32) of a fresh sequence, every position."""
        if not 0 < len(token_ids) <= self.max_model_len:
            raise MoestreamError(f"score takes 1 to {self.max_model_len} tokens, got {len(token_ids)}")
        self._check_vocab(token_ids)
        table: list[int] = []
        if not self.kv.can_allocate(table, len(token_ids)) or (
                self.states is not None and not self.states.can_allocate()):
            raise MoestreamError("not enough free KV cache to score this sequence now; retry when idle")
        self.kv.allocate(table, len(token_ids))
        state_slot = self.states.allocate() if self.states is not None else None
        try:
            n = len(token_ids)
            slots = self.kv.index(table, 0, n)
            batch = BatchInput(
                token_ids=torch.tensor(token_ids, dtype=torch.long),
                positions=torch.arange(n, device=self.device),
                segments=[Segment(0, n, slots, slots, state_slot)],
                logits_rows=torch.arange(n, device=self.device),
            )
            self._batch_rows = ([], [])
            return self.model.forward(batch, self.kv).cpu()
        finally:
            self.kv.free(table)
            if self.states is not None:
                self.states.free(state_slot)

    def close(self) -> None:
        """Flush and close what the engine writes (the routing trace)."""
        if self.recorder is not None:
            self.recorder.close()

    def check_device_memory(self) -> None:
        """CUDA: measure the allocator's peak reservation and the device's free memory against
        the plan; over budget is a warning and fewer expert slots, never an out-of-memory."""
        if self.device.type != "cuda" or self.plan is None:
            return
        reserved = torch.cuda.max_memory_reserved(self.device)
        free, _ = torch.cuda.mem_get_info(self.device)
        n_slots = self.experts.n_slots
        keep = slots_after_measurement(n_slots, self.plan.slot_bytes, reserved, self.plan.budget_bytes, free)
        if keep < n_slots:
            log.warning("measured %s reserved (budget %s, %s free on the device): the expert cache "
                        "shrinks from %d to %d slots; a smaller --ctx-size or --kv-tokens leaves room "
                        "for more", format_bytes(reserved), format_bytes(self.plan.budget_bytes),
                        format_bytes(free), n_slots, keep)
            self.experts.shrink(keep)
            torch.cuda.reset_peak_memory_stats(self.device)

    def device_bytes_used(self) -> int:
        """Measured device memory: the allocator's reservation on CUDA; on the CPU (a
        simulated device) the bytes of the tensors the engine placed there."""
        if self.device.type == "cuda":
            return torch.cuda.memory_reserved(self.device)
        cache = self.experts.buffer.nbytes if self.plan is not None else 0
        return self.kv.nbytes + self.model.resident_bytes + cache

    def stats(self) -> dict:
        stats = dict(self.experts.stats())
        stats.update(kv_cache_usage=self.kv.usage, num_running=len(self.scheduler.running),
                     num_waiting=len(self.scheduler.waiting), prompt_tokens_computed=self.prompt_tokens_computed,
                     prefix_cache_queries=self.kv.blocks.lookup_tokens,
                     prefix_cache_hits=self.kv.blocks.hit_tokens)
        if self.plan is not None:
            stats["vram_used_bytes"] = self.device_bytes_used()
        return stats


class PromptTooLong(MoestreamError):
    """The prompt does not fit the context; the server answers 400 context_length_exceeded."""


class QueueFull(MoestreamError):
    """The waiting queue is full; the server answers 503 with Retry-After."""
