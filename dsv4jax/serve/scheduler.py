"""Host-side bookkeeping: requests, admission (slots and pages), and which rows each step runs.

Pages are taken as sequences grow (SERVING §D.7): admission takes the pages of the prompt, and before each step
every decoding request gets the pages that step can write. When the pool runs short the newest running request
is preempted: its pages and slot are freed and it waits again at the head of the queue, its progress kept as
token ids, which are recomputed as a prompt when it is readmitted. The oldest request always goes on, so a
request that fits the pool alone always finishes. With `reserve` allocation (the earlier behaviour) admission
takes every page a request can need and nothing is ever preempted. A request that could never fit is refused
at submission. Each step runs one prefill chunk for up to `max_prefill_rows` prefilling requests (oldest first)
and one decode (or speculative) step for every request that has finished its prompt.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time

import numpy as np

from dsv4jax.serve.cache import PageAllocator, pages_for, table_row
from dsv4jax.serve.prefix_cache import PrefixCache
from dsv4jax.serve.sampling import SamplingParams


class AdmissionError(ValueError):
    """The request can never be served as given; the message says why and what to change."""


class QueueFullError(RuntimeError):
    """Too many requests are waiting; try again later."""


@dataclasses.dataclass
class Request:
    id: str
    prompt: list[int]
    sampling: SamplingParams
    seed: int
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    slot: int | None = None
    pages: list[int] = dataclasses.field(default_factory=list)
    length: int = 0  # positions the target has processed
    # After a preemption: the prompt and the tokens generated so far, all prefilled again on readmission.
    context: list[int] | None = None
    preemptions: int = 0
    cached_tokens: int | None = None  # prompt positions taken from the prefix cache at first admission
    restore: int | None = None  # snapshot slot its next prefill chunk resumes from (a prefix hit)
    page_keys: list | None = None  # prefix-cache keys of the full pages of `tokens`, computed once
    output: list[int] = dataclasses.field(default_factory=list)  # committed generated tokens
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[float | None] = dataclasses.field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]] | None] = dataclasses.field(default_factory=list)
    text: str = ""  # output text so far, stop strings cut
    text_sent: int = 0  # characters of `text` already returned
    tokens_sent: int = 0
    prompt_sent: bool = False
    finish_reason: str | None = None
    error: str | None = None  # why, when finish_reason is "error"

    @property
    def tokens(self) -> list[int]:
        """What prefill processes: the prompt, or after a preemption the prompt and the generated tokens."""
        return self.prompt if self.context is None else self.context

    @property
    def prefilling(self) -> bool:
        return self.length < len(self.tokens)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def buckets(limit: int, smallest: int = 1) -> list[int]:
    """Powers of two from `smallest` below `limit`, then `limit` itself."""
    sizes, size = [], smallest
    while size < limit:
        sizes.append(size)
        size *= 2
    return sizes + [limit]


def bucket_for(n: int, sizes: list[int]) -> int:
    return next(size for size in sizes if size >= n)


class Scheduler:
    def __init__(self, num_slots: int, num_pages: int, page_tokens: int, pages_per_sequence: int,
                 max_model_len: int, overhang: int, max_waiting: int, on_demand: bool = True,
                 watermark: float = 0.0, prefix_cache: PrefixCache | None = None):
        self.allocator = PageAllocator(num_pages)
        self.prefix_cache = prefix_cache
        self.prefix_queries = self.prefix_hits = 0  # prompt tokens looked up in the prefix cache, and found
        self.on_demand = on_demand
        # Pages admission leaves free for running requests to grow into (vLLM's watermark), unless nothing runs.
        self.watermark_pages = int(math.ceil(watermark * self.allocator.total)) if on_demand else 0
        self.page_tokens, self.pages_per_sequence = page_tokens, pages_per_sequence
        self.max_model_len, self.overhang, self.max_waiting = max_model_len, overhang, max_waiting
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: dict[str, Request] = {}
        self.tables = np.zeros((num_slots + 1, pages_per_sequence), np.int32)  # row num_slots: scratch slot

    def pages_needed(self, request: Request) -> int:
        """The most pages the request can hold: prompt + max_tokens + the speculative overhang."""
        return pages_for(self.end_limit(request), self.page_tokens)

    def end_limit(self, request: Request) -> int:
        return len(request.prompt) + request.sampling.max_tokens + self.overhang

    def pages_at_admission(self, request: Request) -> int:
        """On demand: its prompt (or recomputed context) and the first decode step; reserved: all it can need."""
        if not self.on_demand:
            return self.pages_needed(request)
        return pages_for(min(len(request.tokens) + 1 + self.overhang, self.end_limit(request)), self.page_tokens)

    def check(self, request: Request) -> None:
        """Refuse at submission what could never run."""
        total = len(request.prompt) + request.sampling.max_tokens
        if total > self.max_model_len:
            raise AdmissionError(f"prompt ({len(request.prompt)} tokens) + max_tokens ({request.sampling.max_tokens}) "
                                 f"= {total} exceeds the engine's max_model_len ({self.max_model_len}); shorten the "
                                 f"prompt or lower max_tokens")
        if self.pages_needed(request) > self.allocator.total:
            raise AdmissionError(f"the request needs {self.pages_needed(request)} cache pages but the engine has "
                                 f"{self.allocator.total}; lower max_tokens or start the engine with more pages")

    def has_room(self, queued: int, count: int) -> bool:
        """Whether `count` more requests fit beside `queued` not yet running: those the free slots take at the
        next step do not wait, so they do not count against `max_waiting` (the waiting requests are the ones
        that will wait, as `num_requests_waiting` shows them once the step has run)."""
        return queued + count <= self.max_waiting + len(self.free_slots)

    def admit(self) -> list[Request]:
        """Move waiting requests (first come, first served) into free slots while pages last, each starting
        from the longest prefix of it the prefix cache holds."""
        admitted = []
        while self.waiting and self.free_slots:
            request = self.waiting[0]
            hit = self._lookup(request)
            shared = hit.pages if hit else []
            need = self.pages_at_admission(request) - len(shared)
            if need + (self.watermark_pages if self.running else 0) > self.available():
                if shared:
                    self.prefix_cache.unuse(shared)
                break
            self.waiting.popleft()
            request.slot = self.free_slots.pop()
            request.pages = shared + self.allocate(need)
            if hit:
                request.length, request.restore = hit.tokens, hit.snapshot
            if request.cached_tokens is None:
                request.cached_tokens = hit.tokens if hit else 0
            if self.prefix_cache is not None:
                self.prefix_queries += len(request.prompt)
                self.prefix_hits += hit.tokens if hit else 0
            self.tables[request.slot] = table_row(request.pages, self.pages_per_sequence)
            self.running[request.id] = request
            admitted.append(request)
        return admitted

    def _lookup(self, request: Request):
        """A prefix hit for `request`: never its whole context (its last token is prefilled for the logits), never
        past its prompt (generated tokens would need their penalty counts), none when it wants prompt logprobs."""
        if self.prefix_cache is None or request.sampling.prompt_logprobs is not None:
            return None
        return self.prefix_cache.lookup(request.tokens, min(len(request.prompt), len(request.tokens) - 1),
                                        self.page_keys(request))

    def page_keys(self, request: Request) -> list[tuple]:
        """The prefix-cache keys of the full pages of what the request prefills, computed once per context."""
        if request.page_keys is None:
            tokens = request.tokens
            request.page_keys = PrefixCache.keys(tokens, self.page_tokens, len(tokens) // self.page_tokens)
        return request.page_keys

    def available(self) -> int:
        """Free pages, counting cached pages no running request uses (evicted when needed)."""
        return self.allocator.free + (self.prefix_cache.evictable() if self.prefix_cache is not None else 0)

    def allocate(self, count: int) -> list[int]:
        short = count - self.allocator.free
        if short > 0 and self.prefix_cache is not None:
            self.allocator.release(self.prefix_cache.evict(pages=short))
        return self.allocator.allocate(count)

    def pages_short(self, ends: dict[str, int]) -> int:
        """Pages missing from the free pool for every running request to cover positions [0, ends[id])."""
        want = sum(max(0, self._pages_for_end(self.running[rid], end) - len(self.running[rid].pages))
                   for rid, end in ends.items())
        return want - self.available()

    def grow(self, request: Request, end: int) -> None:
        """Give `request` the pages that positions [0, end) need (at most what it can ever need)."""
        extra = self._pages_for_end(request, end) - len(request.pages)
        if extra > 0:
            request.pages += self.allocate(extra)
            self.tables[request.slot] = table_row(request.pages, self.pages_per_sequence)

    def _pages_for_end(self, request: Request, end: int) -> int:
        return pages_for(min(end, self.end_limit(request)), self.page_tokens)

    def preempt(self, request: Request) -> None:
        """Free the request's pages and slot; it waits at the head of the queue and is recomputed from its
        prompt and generated tokens when readmitted."""
        self.release(request)
        request.context = request.prompt + request.output
        request.length, request.restore, request.page_keys = 0, None, None
        request.preemptions += 1
        self.waiting.appendleft(request)

    def newest_running(self) -> Request | None:
        candidates = [r for r in self.running.values() if not r.finished]
        return max(candidates, key=lambda r: r.arrival) if candidates else None

    def release(self, request: Request) -> None:
        if request.slot is not None:
            pages = request.pages if self.prefix_cache is None else self.prefix_cache.unuse(request.pages)
            self.allocator.release(pages)
            self.tables[request.slot] = 0
            self.free_slots.append(request.slot)
            request.slot, request.pages = None, []
        self.running.pop(request.id, None)

    def prefill_rows(self, limit: int) -> list[Request]:
        rows = [r for r in self.running.values() if r.prefilling and not r.finished]
        return sorted(rows, key=lambda r: r.arrival)[:limit]

    def decode_rows(self) -> list[Request]:
        """Requests whose whole prompt has been dispatched: the device holds their pending token."""
        return [r for r in self.running.values() if not r.prefilling and not r.finished]
