"""A step-based model of vLLM's continuous-batching engine, run in (scaled) virtual time.

Each step admits waiting sequences while there is a free slot and KV room (FCFS, head-of-line
blocking), gives every decoding sequence one token, spends the rest of the token budget on prefill
chunks, then sleeps for the step's cost times ``time_scale``. Prefix-cache hits skip prefill.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .config import SimConfig
from .kv import BlockPool, block_hashes
from .stats import SimStats

__all__ = ("Engine", "EngineDead", "Sequence")

log = structlog.get_logger(__name__)

_MAX_LAG_S = 0.25  # real seconds the step clock may run behind before it stops catching up


class EngineDead(Exception):
    """The simulated engine was killed; generation requests fail with 500."""


@dataclass(eq=False)
class Sequence:
    """One request inside the engine."""

    prompt_ids: list[int]
    output_len: int
    hashes: list[int]
    stream: bool = False
    arrival: float = 0.0
    prefill_target: int = 0
    computed: int = 0
    kv_tokens: int = 0
    generated: int = 0
    cached_tokens: int = -1
    cached_refs: list[int] = field(default_factory=list)
    private_blocks: int = 0
    admitted_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    preemptions: int = 0
    finished: bool = False
    error: str | None = None
    done: anyio.Event = field(default_factory=anyio.Event)
    _send: MemoryObjectSendStream[int] | None = None
    progress: MemoryObjectReceiveStream[int] | None = None

    def __post_init__(self) -> None:
        self.prefill_target = len(self.prompt_ids)
        if self.stream:
            self._send, self.progress = anyio.create_memory_object_stream[int](math.inf)

    def _notify(self) -> None:
        if self._send is not None:
            self._send.send_nowait(self.generated)

    def _close(self) -> None:
        self.finished = True
        self.done.set()
        if self._send is not None:
            self._send.close()


class Engine:
    """The scheduler and its virtual clock."""

    def __init__(self, config: SimConfig, stats: SimStats) -> None:
        self.config = config
        self.stats = stats
        self.pool = BlockPool(config.kv_cache_tokens // config.block_size, caching=config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.dead = False
        self._wake = anyio.Event()
        self._rng = random.Random(config.seed)

    # -- requests ---------------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], output_len: int, *, stream: bool = False, salt: str | None = None) -> Sequence:
        """Queue a sequence; await ``seq.done`` (or read ``seq.progress`` when streaming)."""
        if self.dead:
            raise EngineDead("engine is dead")
        hashes = block_hashes(prompt_ids, self.config.block_size, salt) if self.config.enable_prefix_caching else []
        seq = Sequence(prompt_ids, output_len, hashes, stream=stream, arrival=anyio.current_time())
        self.stats.prompt_tokens += len(prompt_ids)
        self.waiting.append(seq)
        self._wake.set()
        return seq

    def abort(self, seq: Sequence) -> None:
        """Drop a sequence (client went away) and free its blocks."""
        if seq.finished:
            return
        if seq in self.running:
            self.running.remove(seq)
            self._free(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.stats.aborted += 1
        seq.error = "aborted"
        seq._close()

    def kill(self) -> None:
        """Kill the engine: every queued and running sequence fails, new ones are refused."""
        self.dead = True
        for seq in [*self.running, *self.waiting]:
            seq.error = "EngineDeadError: engine core died"
            seq._close()
        self.running.clear()
        self.waiting.clear()
        self._wake.set()

    def revive(self) -> None:
        """Bring a killed engine back (a restarted server)."""
        self.dead = False

    def reset_prefix_cache(self) -> None:
        """Forget every idle cached block (like POST /reset_prefix_cache)."""
        self.pool.reset_cache()

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks held by running sequences."""
        return self.pool.used / self.pool.num_blocks

    # -- the loop ---------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Step forever; start it in a task group with ``await tg.start(engine.run)``."""
        task_status.started()
        scale = self.config.time_scale
        next_at = anyio.current_time()
        while True:
            if (not self.running and not self.waiting) or self.dead:
                self._wake = anyio.Event()
                await self._wake.wait()
                next_at = anyio.current_time()
                continue
            plan, seconds = self._schedule()
            self.stats.busy_virtual_s += seconds
            next_at = max(next_at + seconds * scale, anyio.current_time() - _MAX_LAG_S)
            await anyio.sleep_until(next_at)
            if not self.dead:
                self._apply(plan)

    def _schedule(self) -> tuple[list[tuple[Sequence, int]], float]:
        cfg = self.config
        while self.waiting and len(self.running) < cfg.max_num_seqs:
            if not self._admit(self.waiting[0]):
                break  # head-of-line blocking, as in vLLM's FCFS scheduler
            self.running.append(self.waiting.popleft())
        budget = cfg.max_num_batched_tokens
        plan: list[tuple[Sequence, int]] = []
        n_decode = 0
        for seq in list(self.running):
            if seq.finished or seq.computed < seq.prefill_target:
                continue
            if not self._reserve(seq, seq.kv_tokens + 1):
                continue  # preempted itself
            plan.append((seq, 0))
            n_decode += 1
        budget -= n_decode
        n_prefill = 0
        for seq in self.running:
            if budget <= 0:
                break
            if seq.computed < seq.prefill_target:
                chunk = min(seq.prefill_target - seq.computed, budget)
                plan.append((seq, chunk))
                budget -= chunk
                n_prefill += chunk
        seconds = cfg.latency.step_seconds(n_decode, n_prefill)
        if cfg.latency.jitter:
            seconds *= min(max(self._rng.gauss(1.0, cfg.latency.jitter), 0.3), 1.7)
        self.stats.steps += 1
        self.stats.max_waiting = max(self.stats.max_waiting, len(self.waiting))
        self.stats.batch_sizes[len(plan)] += 1
        self.stats.iteration_tokens.observe(n_decode + n_prefill)
        self.stats.prefill_computed_tokens += n_prefill
        return plan, seconds

    def _admit(self, seq: Sequence) -> bool:
        bs = self.config.block_size
        target = seq.prefill_target
        hit = self.pool.match(seq.hashes, (target - 1) // bs)  # the last prompt token is always computed
        need = math.ceil(target / bs) - hit
        refs = seq.hashes[:hit]
        self.pool.acquire_cached(refs)  # before allocating, so eviction cannot take the blocks we hit
        if not self.pool.allocate(need):
            self.pool.release(refs, 0)
            return False
        seq.cached_refs = refs
        seq.private_blocks = need
        seq.computed = seq.kv_tokens = hit * bs
        if seq.cached_tokens < 0:  # count the first admission only; a preempted one recomputes
            seq.cached_tokens = hit * bs
            seq.admitted_at = anyio.current_time()
            self.stats.prefix_cache_queries += target
            self.stats.prefix_cache_hits += hit * bs
            self.stats.queue_time.observe(seq.admitted_at - seq.arrival)
        return True

    def _reserve(self, seq: Sequence, tokens: int) -> bool:
        """Make sure ``seq`` holds blocks for ``tokens``; preempt the newest sequences if KV is full."""
        bs = self.config.block_size
        while len(seq.cached_refs) + seq.private_blocks < math.ceil(tokens / bs):
            if self.pool.allocate(1):
                seq.private_blocks += 1
                continue
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        # recompute prompt and what was generated so far, like vLLM's recompute preemption
        seq.prefill_target = len(seq.prompt_ids) + seq.generated
        seq.computed = seq.kv_tokens = 0
        self.waiting.appendleft(seq)
        seq.preemptions += 1
        self.stats.preemptions += 1

    def _free(self, seq: Sequence) -> None:
        self.pool.release(seq.cached_refs, seq.private_blocks)
        seq.cached_refs = []
        seq.private_blocks = 0

    def _apply(self, plan: list[tuple[Sequence, int]]) -> None:
        now = anyio.current_time()
        finished: list[Sequence] = []
        for seq, chunk in plan:
            if seq.finished:
                continue
            if chunk:
                seq.computed += chunk
                seq.kv_tokens += chunk
                if seq.computed < seq.prefill_target:
                    continue
                self._cache_prompt(seq)
            else:
                seq.kv_tokens += 1
            if seq.generated < seq.output_len:
                seq.generated += 1
                self.stats.generation_tokens += 1
                if seq.first_token_at is None:
                    seq.first_token_at = now
                    self.stats.ttft.observe(now - seq.arrival)
                elif seq.last_token_at is not None:
                    self.stats.inter_token_latency.observe(now - seq.last_token_at)
                seq.last_token_at = now
                seq._notify()
            if seq.generated >= seq.output_len:
                finished.append(seq)
        for seq in finished:
            self.running.remove(seq)
            self._free(seq)
            self._observe_finished(seq, now)
            seq._close()

    def _observe_finished(self, seq: Sequence, now: float) -> None:
        stats = self.stats
        stats.e2e.observe(now - seq.arrival)
        stats.request_prompt_tokens.observe(len(seq.prompt_ids))
        stats.request_generation_tokens.observe(seq.generated)
        stats.request_prefill_kv_computed_tokens.observe(len(seq.prompt_ids) - max(seq.cached_tokens, 0))
        stats.request_preemptions.observe(seq.preemptions)
        admitted = seq.admitted_at if seq.admitted_at is not None else seq.arrival
        first = seq.first_token_at if seq.first_token_at is not None else now
        stats.inference_time.observe(now - admitted)
        stats.prefill_time.observe(first - admitted)
        stats.decode_time.observe(now - first)
        if seq.generated > 1:
            stats.time_per_output_token.observe((now - first) / (seq.generated - 1))

    def _cache_prompt(self, seq: Sequence) -> None:
        if not self.pool.caching:
            return
        computed_full = min(len(seq.hashes), seq.prefill_target // self.config.block_size)
        fresh = seq.hashes[len(seq.cached_refs) : computed_full]
        self.pool.promote(fresh)
        seq.private_blocks -= len(fresh)
        seq.cached_refs = seq.cached_refs + fresh

    def state(self) -> dict[str, Any]:
        """Live gauges."""
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "kv_cache_usage": self.kv_usage,
            "dead": self.dead,
        }
