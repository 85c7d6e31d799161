"""The engine behind asyncio: `Engine.step()` runs in one background thread (the engine is single-threaded), each
request's outputs reach its handler through its own asyncio queue, and a handler that stops listening (client
gone) aborts its request so its pages come back (SERVING §D.1 "abort on client disconnect")."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field

log = logging.getLogger("dsv4jax.serve")


class EngineDeadError(RuntimeError):
    """The engine thread failed; the server cannot generate any more (see the log for the traceback)."""


@dataclass
class RequestStream:
    """What `submit` hands back: the request id and the queue its outputs arrive on."""

    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    num_prompt_tokens: int
    submitted: float = field(default_factory=time.perf_counter)
    last_token: float | None = None
    finished: bool = False
    aborted: bool = False


class AsyncEngine:
    def __init__(self, engine, metrics=None, idle_poll_s: float = 0.05):
        self.engine = engine
        self.metrics = metrics
        self.idle_poll_s = idle_poll_s
        self.error: BaseException | None = None
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._stats: dict = {}
        self._thread = threading.Thread(target=self._run, name="dsv4jax-engine", daemon=True)

    # -- lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> "AsyncEngine":
        self._refresh_stats()
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def healthy(self) -> bool:
        """False only when the engine cannot go on (its thread failed or stopped); a request that failed on its
        own does not count (SERVING §D.1)."""
        return self.error is None and self._thread.is_alive()

    @property
    def capacity(self) -> int | None:
        """The most requests the engine ever holds at once (None: no such bound is known)."""
        return getattr(self.engine, "capacity", None)

    def stats(self) -> dict:
        """The engine's stats as of its last step (read here, written by the engine thread only)."""
        return dict(self._stats)

    # -- requests (called on the event loop) ------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], sampling, request_id: str | None = None) -> RequestStream:
        """Queue a request; raises the engine's AdmissionError / QueueFullError at once. Then `outputs(...)`."""
        return self.submit_many([(prompt_ids, sampling)], [request_id])[0]

    def submit_many(self, jobs: list[tuple[list[int], object]], request_ids=None) -> list[RequestStream]:
        """Queue every (prompt ids, sampling) or none (the engine's `submit_batch`): a refused batch leaves no
        request behind to crowd out other clients, and counts as no abort."""
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self.error!r}")
        loop = asyncio.get_running_loop()
        ids = [rid or uuid.uuid4().hex for rid in (request_ids or [None] * len(jobs))]
        streams = [RequestStream(rid, loop, asyncio.Queue(), len(ids_)) for rid, (ids_, _) in zip(ids, jobs)]
        with self._lock:  # registered first: the engine thread may answer before submit returns
            self._streams.update((s.request_id, s) for s in streams)
        try:
            items = [(prompt, sampling, rid) for rid, (prompt, sampling) in zip(ids, jobs)]
            if hasattr(self.engine, "submit_batch"):
                self.engine.submit_batch(items)
            else:  # an engine without batches: one by one, taking back the ones already in on a refusal
                done = []
                try:
                    for prompt, sampling, rid in items:
                        self.engine.submit(prompt, sampling, request_id=rid)
                        done.append(rid)
                except BaseException:
                    for rid in done:
                        self.engine.abort(rid)
                    raise
        except BaseException:
            with self._lock:
                for s in streams:
                    self._streams.pop(s.request_id, None)
            raise
        self._wake.set()
        return streams

    async def outputs(self, stream: RequestStream):
        """Yield the request's RequestOutputs up to the finished one. Leaving early (a disconnect cancels the
        handler, or the consumer stops) aborts the request."""
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if not stream.finished:
                self.abort(stream.request_id)

    def abort(self, rid: str) -> None:
        """Idempotent (counted once in num_requests_abandoned). The engine frees the pages; its final "abort"
        output is dropped unread."""
        with self._lock:
            stream = self._streams.get(rid)
            first = stream is not None and not stream.finished and not stream.aborted
            if first:
                stream.aborted = True
        if first:
            if self.metrics is not None:
                self.metrics.client_aborts.inc()
            self.engine.abort(rid)
            self._wake.set()

    # -- the engine thread --------------------------------------------------------------------------------------

    def _refresh_stats(self) -> None:
        self._stats = self.engine.stats()
        if self.metrics is not None:
            self.metrics.set_stats(self._stats)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self.engine.has_unfinished():
                    outputs = self.engine.step()
                    now = time.perf_counter()
                    for output in outputs:
                        try:
                            self._deliver(output, now)
                        except Exception:  # noqa: BLE001 - one output's bookkeeping must not stop the rest
                            log.error("delivering an output of %s failed:\n%s", output.request_id,
                                      traceback.format_exc())
                    self._refresh_stats()
                else:
                    self._refresh_stats()
                    self._wake.wait(self.idle_poll_s)
                    self._wake.clear()
        except BaseException as error:  # noqa: BLE001 - every waiting handler must hear of it
            log.error("engine thread failed:\n%s", traceback.format_exc())
            self.error = error
            dead = EngineDeadError(f"the engine stopped after an error: {error!r}")
            with self._lock:
                streams, self._streams = list(self._streams.values()), {}
            for stream in streams:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, dead)

    def _deliver(self, output, now: float) -> None:
        with self._lock:
            stream = self._streams.get(output.request_id)
            if stream is None:
                return
            if output.finished:
                stream.finished = True
                del self._streams[output.request_id]
        try:
            self._observe(stream, output, now)
        finally:  # the handler hears of its output whatever the metrics did
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, output)

    def _observe(self, stream: RequestStream, output, now: float) -> None:
        if self.metrics is not None and output.token_ids:
            n = len(output.token_ids)
            if stream.last_token is None:
                self.metrics.ttft.observe(now - stream.submitted)
                self.metrics.prompt_tokens.inc(stream.num_prompt_tokens)
            else:
                for _ in range(n):  # a speculative step delivers several tokens at once
                    self.metrics.itl.observe((now - stream.last_token) / n)
            stream.last_token = now
            self.metrics.generation_tokens.inc(n)
        if self.metrics is not None and output.finished:
            self.metrics.e2e.observe(now - stream.submitted)
