"""Host-side bookkeeping: requests, admission (slots and pages), and which rows each step runs.

Admission reserves every page a request can need (prompt + max_tokens + the speculative overhang) up front, so
a running request never runs out of pages and nothing needs preempting; a request that could never fit is
refused at submission. Each step runs one prefill chunk for up to `max_prefill_rows` prefilling requests
(oldest first) and one decode (or speculative) step for every request that has finished its prompt.
"""

from __future__ import annotations

import collections
import dataclasses
import time

import numpy as np

from dsv4jax.serve.cache import PageAllocator, pages_for, table_row
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
    def prefilling(self) -> bool:
        return self.length < len(self.prompt)

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
                 max_model_len: int, overhang: int, max_waiting: int):
        self.allocator = PageAllocator(num_pages)
        self.page_tokens, self.pages_per_sequence = page_tokens, pages_per_sequence
        self.max_model_len, self.overhang, self.max_waiting = max_model_len, overhang, max_waiting
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: dict[str, Request] = {}
        self.tables = np.zeros((num_slots + 1, pages_per_sequence), np.int32)  # row num_slots: scratch slot

    def pages_needed(self, request: Request) -> int:
        return pages_for(len(request.prompt) + request.sampling.max_tokens + self.overhang, self.page_tokens)

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
        """Move waiting requests (first come, first served) into free slots while pages last."""
        admitted = []
        while self.waiting and self.free_slots and self.pages_needed(self.waiting[0]) <= self.allocator.free:
            request = self.waiting.popleft()
            request.slot = self.free_slots.pop()
            request.pages = self.allocator.allocate(self.pages_needed(request))
            self.tables[request.slot] = table_row(request.pages, self.pages_per_sequence)
            self.running[request.id] = request
            admitted.append(request)
        return admitted

    def release(self, request: Request) -> None:
        if request.slot is not None:
            self.allocator.release(request.pages)
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
