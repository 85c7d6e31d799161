"""The inference engine: continuous batching over paged V4 caches, chunked prefill beside decode, per-request
sampling, and MTP speculative decoding.

    engine = Engine(dsv4jax.load(), EngineConfig(max_running_requests=8, speculative_steps=2))
    engine.warmup()                                   # compiles every shape bucket once
    completions = engine.generate(["def main(", "import "], SamplingParams(max_tokens=64, temperature=0))

Each `step()` admits waiting requests, dispatches one prefill chunk for the oldest prefilling requests and one
decode (or speculative) step for the others, then reads the previous step back (overlap, SERVING §D.5)
and returns what each request produced. Device work is a handful of ahead-of-time compiled executables, one per
shape bucket (rows × chunk length); steady state compiles nothing. `submit` and `abort` may be called from other
threads; `step` from one thread only.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import math
import os
import threading
import time
from typing import Iterator

import jax
import numpy as np

from dsv4jax.config import ConfigError
from dsv4jax.serve.cache import init_caches, pages_for
from dsv4jax.serve.prefix_cache import PrefixCache
from dsv4jax.serve.sampling import SamplingParams, SamplingRows
from dsv4jax.serve.scheduler import AdmissionError, QueueFullError, Request, Scheduler, bucket_for, buckets
from dsv4jax.serve.speculative import speculative_step
from dsv4jax.run import Runner
from dsv4jax.sharding.mesh import MeshError
from dsv4jax.serve.steps import Batch, decode_step, prefill_step

__all__ = ["Engine", "EngineConfig", "AdmissionError", "QueueFullError", "RequestOutput", "Completion",
           "SamplingParams"]

log = logging.getLogger("dsv4jax.serve")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_running_requests: int = 8  # cache slots: requests decoding at once
    max_model_len: int = 4096  # prompt + generated tokens of one request
    page_tokens: int = 256  # positions per cache page (a multiple of every compression ratio)
    num_pages: int | None = None  # None: enough for every slot at max_model_len
    # "on_demand": pages are taken as sequences grow, the newest request preempted when none is
    # free (SERVING §D.7); "reserve": admission takes every page a request can need, nothing is preempted.
    page_allocation: str = "on_demand"
    page_watermark: float = 0.01  # fraction of the pool admission leaves free for running requests to grow into
    # Prefix caching (SERVING §D.8): prompt pages and ring snapshots at page boundaries kept for later requests.
    prefix_cache: bool = True
    prefix_cache_snapshots: int | None = None  # snapshot slots on the device; None: 4 per running request
    prefill_chunk: int = 256  # most prompt tokens per request per step
    prefill_buckets: tuple[int, ...] = ()  # chunk lengths compiled; () = prefill_chunk/16, /4, /1
    max_prefill_rows: int = 4  # requests prefilled together in one step
    decode_buckets: tuple[int, ...] = ()  # batch sizes compiled for decode; () = powers of two up to max_running
    prefill_row_buckets: tuple[int, ...] = ()  # the same for prefill rows, up to max_prefill_rows
    speculative_steps: int = 0  # MTP drafts per step (0: off, 1–3)
    max_waiting_requests: int = 256
    prompt_logprobs: bool = True  # compile prefill with per-token prompt logprobs (echo); False skips that LM head
    overlap: bool = True  # dispatch each step before reading the previous one back (SERVING §D.5)
    # One shape per step kind (every decode step max_running_requests rows, every prefill max_prefill_rows ×
    # prefill_chunk): a request's tokens and logprobs then never depend on its companions (SERVING §D.6).
    deterministic: bool = False
    seed: int = 0  # seeds requests that give none

    def validate(self, model_config) -> None:
        def need(ok, field, allowed):
            if not ok:
                raise ConfigError(f"EngineConfig.{field}={getattr(self, field)!r} is invalid: {allowed}")

        ratios = [r for r in model_config.compress_ratios if r] or [1]
        multiple = math.lcm(*ratios)
        need(self.max_running_requests >= 1, "max_running_requests", "need at least 1")
        need(1 <= self.max_model_len <= model_config.max_position_embeddings, "max_model_len",
             f"need 1 ≤ max_model_len ≤ the model's max_position_embeddings ({model_config.max_position_embeddings})")
        need(self.page_tokens >= multiple and self.page_tokens % multiple == 0, "page_tokens",
             f"must be a positive multiple of {multiple} (the compression ratios {sorted(set(ratios))})")
        need(self.prefill_chunk >= 1, "prefill_chunk", "need at least 1")
        need(all(1 <= b <= self.prefill_chunk for b in self.prefill_buckets), "prefill_buckets",
             f"each bucket must lie in [1, prefill_chunk={self.prefill_chunk}]")
        need(self.max_prefill_rows >= 1, "max_prefill_rows", "need at least 1")
        need(all(1 <= b <= self.max_running_requests for b in self.decode_buckets), "decode_buckets",
             f"each bucket must lie in [1, max_running_requests={self.max_running_requests}]")
        need(all(1 <= b <= self.prefill_rows for b in self.prefill_row_buckets), "prefill_row_buckets",
             f"each bucket must lie in [1, min(max_prefill_rows, max_running_requests)={self.prefill_rows}]")
        need(0 <= self.speculative_steps <= 3, "speculative_steps", "MTP speculation takes 0 (off) to 3 steps")
        need(self.speculative_steps == 0 or model_config.num_mtp_layers > 0, "speculative_steps",
             "the model has no MTP layer; use 0")
        need(self.max_waiting_requests >= 0, "max_waiting_requests", "need ≥ 0")
        chosen = [name for name in ("prefill_buckets", "decode_buckets", "prefill_row_buckets") if getattr(self, name)]
        if self.deterministic and chosen:
            raise ConfigError(f"EngineConfig.deterministic=True runs one shape per step kind, so it takes no "
                              f"buckets; leave {', '.join(chosen)} empty")
        pages = self.num_pages
        need(pages is None or pages >= 2, "num_pages", "need at least 2 (page 0 is scratch)")
        need(self.page_allocation in ("on_demand", "reserve"), "page_allocation", 'one of "on_demand", "reserve"')
        need(0.0 <= self.page_watermark < 1.0, "page_watermark", "a fraction of the pool in [0, 1)")
        need(self.prefix_cache_snapshots is None or self.prefix_cache_snapshots >= 1, "prefix_cache_snapshots",
             "need at least 1 (or prefix_cache=False)")

    @property
    def prefill_rows(self) -> int:
        return min(self.max_prefill_rows, self.max_running_requests)

    def row_buckets(self, limit: int, chosen: tuple[int, ...]) -> list[int]:
        if self.deterministic:
            return [limit]
        return sorted(set(chosen) | {limit}) if chosen else buckets(limit)

    def chunk_buckets(self) -> list[int]:
        if self.deterministic:
            return [self.prefill_chunk]
        if self.prefill_buckets:
            return sorted(set(self.prefill_buckets) | {self.prefill_chunk})
        return sorted({max(1, self.prefill_chunk // 16), max(1, self.prefill_chunk // 4), self.prefill_chunk})


@dataclasses.dataclass
class RequestOutput:
    """What one request produced in one step (deltas), and whether it is done."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    prompt_logprobs: list[float | None] | None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort", or "error" (then `error` says why)
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclasses.dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    num_cached_tokens: int = 0


class Engine:
    def __init__(self, model, config: EngineConfig = EngineConfig(), mesh=None, devices=None,
                 runner: Runner | None = None):
        """Runs on `runner`, or on a new one over `mesh`: None (one device) or a spec such as "cp=2,tp=2,ep=2"
        (dp=1: every sequence is on every rank) over `devices` (default all)."""
        config.validate(model.config)
        self.runner = runner or Runner(model.graphdef, mesh, devices)
        if self.runner.mesh is not None and self.runner.mesh.dp != 1:
            raise MeshError(f"the serving engine keeps every sequence on every rank: use dp=1 (got "
                            f"dp={self.runner.mesh.dp}); spread the model with cp, tp and ep instead")
        unaligned = [c for c in config.chunk_buckets() if c % self.runner.alignment]
        if unaligned:
            raise ConfigError(f"prefill chunk sizes {unaligned} cannot be split over the mesh's cp ranks: make "
                              f"prefill_chunk and prefill_buckets multiples of {self.runner.alignment}")
        self.model, self.config, self.tokenizer = model, config, model.tokenizer
        self.model_config = model.config
        steps = config.speculative_steps
        self.pages_per_sequence = pages_for(config.max_model_len + steps, config.page_tokens)
        num_pages = config.num_pages or config.max_running_requests * self.pages_per_sequence + 1
        self.snapshots = (config.prefix_cache_snapshots or 4 * config.max_running_requests) if config.prefix_cache \
            else 0
        prefix_cache = PrefixCache(config.page_tokens, self.snapshots, match_next_token=steps > 0) \
            if self.snapshots else None
        self.scheduler = Scheduler(config.max_running_requests, num_pages, config.page_tokens,
                                   self.pages_per_sequence, config.max_model_len, steps, config.max_waiting_requests,
                                   on_demand=config.page_allocation == "on_demand", watermark=config.page_watermark,
                                   prefix_cache=prefix_cache)
        self.scratch_slot = config.max_running_requests
        self.caches = self.runner.replicate(init_caches(model.config, config.max_running_requests, num_pages,
                                                        config.page_tokens, steps, self.snapshots))
        self.params = self.runner.place_params(model.params)
        self.decode_buckets = config.row_buckets(config.max_running_requests, config.decode_buckets)
        self.prefill_row_buckets = config.row_buckets(config.prefill_rows, config.prefill_row_buckets)
        self.chunk_buckets = config.chunk_buckets()
        self._executables: dict[tuple, object] = {}
        self._in_flight: list[_Dispatched] = []  # dispatched by the last step, read back by the next
        self._dispatching: list[_Dispatched] = []
        self._compiling: dict[tuple, concurrent.futures.Future] = {}  # claimed by `step` or a warm-up thread
        self._compile_lock = threading.Lock()
        self._inbox: list[Request] = []
        self._aborts: list[str] = []
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._seeds = np.random.default_rng(config.seed)
        self._known: set[str] = set()
        self.counters = dict(finished=0, aborted=0, failed=0, preempted=0, drafted_tokens=0, accepted_tokens=0,
                             speculative_rounds=0, steps=0)

    # ---- public API -------------------------------------------------------------------------------------------

    def submit(self, prompt_ids, sampling: SamplingParams = SamplingParams(), request_id: str | None = None) -> str:
        """Queue a request; raises AdmissionError (never fits) or QueueFullError (try later). Thread-safe."""
        return self.submit_batch([(prompt_ids, sampling, request_id)])[0]

    @property
    def capacity(self) -> int:
        """The most requests the engine holds at once (running slots + the waiting queue): a batch larger than
        this can never be admitted, however long the client waits."""
        return self.config.max_running_requests + self.config.max_waiting_requests

    def submit_batch(self, items) -> list[str]:
        """Queue several (prompt ids, sampling, request id or None) at once, all or none: AdmissionError if one
        can never run (or the batch is larger than `capacity`), QueueFullError if they do not fit now. A refused
        batch leaves nothing behind, so it never crowds out other callers. Thread-safe."""
        vocab = self.model_config.vocab_size
        if len(items) > self.capacity:
            raise AdmissionError(f"{len(items)} requests at once can never be admitted: this engine holds at most "
                                 f"{self.capacity} (max_running_requests {self.config.max_running_requests} + "
                                 f"max_waiting_requests {self.config.max_waiting_requests})")
        checked = []
        for prompt_ids, sampling, request_id in items:
            prompt = [int(t) for t in prompt_ids]
            if not prompt:
                raise AdmissionError("the prompt is empty; give at least one token")
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise AdmissionError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
            try:
                sampling.validate(vocab)
            except ValueError as error:
                raise AdmissionError(str(error)) from None
            if sampling.prompt_logprobs is not None and not self.config.prompt_logprobs:
                raise AdmissionError("prompt_logprobs needs an engine started with "
                                     "EngineConfig(prompt_logprobs=True)")
            checked.append((prompt, sampling, request_id))
        with self._lock:
            requests = []
            for prompt, sampling, request_id in checked:
                rid = request_id if request_id is not None else f"req-{next(self._ids)}"
                if rid in self._known or any(r.id == rid for r in requests):
                    raise AdmissionError(f"request id {rid!r} is already in use")
                seed = sampling.seed if sampling.seed is not None else int(self._seeds.integers(2**31))
                request = Request(id=rid, prompt=prompt, sampling=sampling, seed=seed)
                self.scheduler.check(request)
                requests.append(request)
            queued = len(self.scheduler.waiting) + len(self._inbox)
            if not self.scheduler.has_room(queued, len(requests)):
                raise QueueFullError(f"{queued} requests are queued for {len(self.scheduler.free_slots)} free slots "
                                     f"and {self.config.max_waiting_requests} waiting places; {len(requests)} more "
                                     f"do not fit now, retry later")
            self._known.update(r.id for r in requests)
            self._inbox.extend(requests)
        return [r.id for r in requests]

    def abort(self, request_id: str) -> None:
        """Stop a request and free its pages (idempotent); its last output has finish_reason "abort"."""
        with self._lock:
            self._aborts.append(request_id)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._inbox or self._aborts or self.scheduler.waiting or self.scheduler.running
                        or self._in_flight)

    def stats(self) -> dict:
        scheduler = self.scheduler
        allocator, cache = scheduler.allocator, scheduler.prefix_cache
        return dict(running=len(scheduler.running), waiting=len(scheduler.waiting) + len(self._inbox),
                    pages_used=allocator.total - scheduler.available(), pages_total=allocator.total,
                    pages_cached=len(cache.entries) if cache is not None else 0,
                    prefix_cache_queries=scheduler.prefix_queries, prefix_cache_hits=scheduler.prefix_hits,
                    compiles=self.compiles, buckets_total=len(self.bucket_keys()), **self.counters)

    def bucket_keys(self) -> list[tuple]:
        """Every shape bucket this engine can use, in the order a cold server needs them: what a first short
        request runs (one prompt row, the shortest chunk, then decode of one), then the rest smallest first."""
        prefill = [("prefill", rows, chunk) for rows in self.prefill_row_buckets for chunk in self.chunk_buckets]
        decode = [("decode", rows, None) for rows in self.decode_buckets]
        first = [prefill[0], decode[0]]
        rest = sorted((key for key in prefill + decode if key not in first), key=lambda key: (key[1], key[2] or 1))
        return first + rest

    def warmup(self, threads: int | None = None, report=None) -> list[dict]:
        """Compile every bucket this engine can use, so that serving never compiles. Buckets are lowered one by
        one (tracing holds the GIL) and compiled in `threads` threads at once (XLA compiles without it; default:
        all of them, bounded by half the cores). Returns one record per bucket compiled by this call: {"bucket",
        "lower_s", "compile_s"}; `report(record)` is called as each is lowered and again when it has compiled.
        A bucket that `step` (or another warm-up) is compiling already is waited for, never compiled twice."""
        report = report or (lambda record: None)
        keys = [key for key in self.bucket_keys() if key not in self._executables]
        threads = max(1, threads or min(len(keys), (os.cpu_count() or 2) // 2))
        records, compiles, waited = [], [], []
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            for key in keys:
                # Claim and lower the next bucket only once a compile thread is free: a bucket claimed early would
                # make a step that needs it wait behind the whole queue.
                pending = [f for f in compiles if not f.done()]
                if len(pending) >= threads:
                    concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                future, mine = self._claim(key)
                if not mine:
                    waited.append(future)
                    continue
                record = {"bucket": _bucket_name(key)}
                lowered = self._lower_claimed(key, future, record)
                report(record)
                records.append(record)
                compiles.append(pool.submit(self._finish_compile, key, future, lowered, record, report))
            for done in compiles + waited:
                done.result()
        return records

    def warmup_in_background(self, threads: int = 1, report=None) -> threading.Thread:
        """Start `warmup` on a daemon thread and return it: the engine serves at once, a request whose bucket is
        not ready compiles it (or waits for the warm-up compiling it), and the warm-up goes on with the rest in
        `bucket_keys` order (SERVING §D.4). A failure is logged and left to the step that needs that bucket."""
        def run():
            try:
                self.warmup(threads=threads, report=report)
            except Exception:  # noqa: BLE001 - the step that needs the bucket compiles it and reports the error
                log.exception("background warm-up stopped")

        thread = threading.Thread(target=run, name="dsv4jax-warmup", daemon=True)
        thread.start()
        return thread

    @property
    def compiles(self) -> int:
        """Executables compiled so far (one per shape bucket used)."""
        return len(self._executables)

    def step(self) -> list[RequestOutput]:
        """Admit, dispatch a prefill chunk and a decode step, read back the previous step's (with `overlap`; else
        this step's) results; returns the outputs of every request that changed."""
        touched: dict[str, Request] = {}
        self._take_commands(touched)
        self.scheduler.admit()
        self._grow_pages(touched)
        self._dispatching = []
        prefill = self.scheduler.prefill_rows(self.config.prefill_rows)
        if prefill:
            self._prefill(prefill, touched)
        decode = self.scheduler.decode_rows()
        if decode:
            self._decode(decode, touched)
        # With overlap the device already holds this step when the host waits for the previous one, so it never
        # idles on the host's bookkeeping; a request that finished there costs its row one step here.
        ready, self._in_flight = self._in_flight, self._dispatching
        if not self.config.overlap:
            ready, self._in_flight = ready + self._in_flight, []
        for dispatched in ready:
            self._collect(dispatched, touched)
        self.counters["steps"] += 1
        outputs = [self._output(r) for r in touched.values()]
        self._retire(touched)
        return outputs

    def _retire(self, touched) -> None:
        """Free the slots and pages of the touched requests that have finished (once each)."""
        for request in touched.values():
            if request.finished and request.id in self._known:
                self.scheduler.release(request)
                with self._lock:
                    self._known.discard(request.id)
                self.counters["aborted" if request.finish_reason == "abort" else
                              "failed" if request.finish_reason == "error" else "finished"] += 1

    def _grow_pages(self, touched) -> None:
        """On-demand pages for what this step can write (SERVING §D.7). A decoding request may have one step in
        flight that the host has not counted yet, so it gets pages for two steps past its committed length; a
        prefilling one has its prompt's pages from admission. If the pool runs short, the step in flight is read
        back first (its finished requests free their pages), then the newest requests are preempted."""
        scheduler = self.scheduler
        if not scheduler.on_demand:
            return
        per_step = 1 + self.config.speculative_steps
        drained = False
        while True:
            ends = {r.id: r.length + 2 * per_step for r in scheduler.running.values()
                    if not r.prefilling and not r.finished}
            if scheduler.pages_short(ends) <= 0:
                break
            if self._in_flight and not drained:  # a preempted request must have nothing in flight
                ready, self._in_flight = self._in_flight, []
                for dispatched in ready:
                    self._collect(dispatched, touched)
                self._retire(touched)
                drained = True
                continue
            victim = scheduler.newest_running()
            if victim is None or len(scheduler.running) == 1:
                raise RuntimeError("the page pool cannot hold one request that admission accepted")  # a bug
            log.info("preempting request %s (%d tokens) for pages", victim.id, victim.length)
            scheduler.preempt(victim)
            self.counters["preempted"] += 1
        for rid in ends:
            scheduler.grow(scheduler.running[rid], ends[rid])

    def generate(self, prompts, sampling: SamplingParams | list[SamplingParams] = SamplingParams()) -> list[Completion]:
        """Run a batch of prompts (text or token ids) to completion; results in prompt order."""
        prompts = list(prompts)
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        encoded = [self.model.encode(p) for p in prompts]
        ids = [self.submit(p, s) for p, s in zip(encoded, params)]
        done: dict[str, Completion] = {}
        parts: dict[str, list[RequestOutput]] = {rid: [] for rid in ids}
        while len(done) < len(ids):
            for out in self.step():
                if out.request_id in parts:
                    parts[out.request_id].append(out)
                    if out.finished:
                        done[out.request_id] = _join(out.request_id, encoded[ids.index(out.request_id)],
                                                     parts[out.request_id])
        return [done[rid] for rid in ids]

    def stream(self, prompt, sampling: SamplingParams = SamplingParams()) -> Iterator[RequestOutput]:
        """Submit one prompt and yield its outputs as steps produce them (steps the whole engine)."""
        rid = self.submit(self.model.encode(prompt), sampling)
        while True:
            for out in self.step():
                if out.request_id == rid:
                    yield out
                    if out.finished:
                        return

    # ---- steps ------------------------------------------------------------------------------------------------

    def _take_commands(self, touched) -> None:
        with self._lock:
            inbox, aborts = self._inbox, self._aborts
            self._inbox, self._aborts = [], []
        self.scheduler.waiting.extend(inbox)
        for rid in aborts:
            request = self.scheduler.running.get(rid) or next((r for r in self.scheduler.waiting if r.id == rid), None)
            if request is None or request.finished:
                continue
            if request in self.scheduler.waiting:
                self.scheduler.waiting.remove(request)
            request.finish_reason = "abort"
            touched[rid] = request

    def _batch(self, requests: list[Request], size: int) -> Batch:
        pad = size - len(requests)
        slots = np.asarray([r.slot for r in requests] + [self.scratch_slot] * pad, np.int32)
        return Batch(slots=slots, starts=np.asarray([r.length for r in requests] + [0] * pad, np.int32),
                     tables=self.scheduler.tables[slots],
                     sampling=SamplingRows.from_params([r.sampling for r in requests] + [None] * pad,
                                                       [r.seed for r in requests] + [0] * pad))

    # A failure while running some requests fails those requests only (SERVING §D.1): a batch that
    # raises is run again one request at a time, so the culprit is found and the others carry on; host-side
    # bookkeeping after the device step is per request. Only a failure that leaves the caches unusable (donated
    # buffers consumed by a failed executable) stops the engine.

    def _fail(self, r: Request, error: BaseException, touched) -> None:
        log.error("request %s failed: %r", r.id, error, exc_info=error)
        r.finish_reason, r.error = "error", f"{type(error).__name__}: {error}"
        touched[r.id] = r

    def _isolate(self, run_batch, requests: list[Request], error: BaseException, touched) -> None:
        if any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(self.caches)):
            raise error  # the caches are gone with the failed step: nothing can continue
        if len(requests) == 1:
            self._fail(requests[0], error, touched)
            return
        for r in requests:
            run_batch([r], touched)

    def _prefill(self, requests: list[Request], touched) -> None:
        snapshot_to = None
        try:
            lengths = [min(len(r.tokens) - r.length, self.config.prefill_chunk) for r in requests]
            rows = bucket_for(len(requests), self.prefill_row_buckets)
            chunk = bucket_for(max(lengths), self.chunk_buckets)
            ids = np.zeros((rows, chunk), np.int32)
            next_ids = np.zeros((rows, chunk), np.int32)
            num_new = np.zeros((rows,), np.int32)
            final = np.zeros((rows,), bool)
            generated_from = np.zeros((rows,), np.int32)
            restore_from = np.full((rows,), self.snapshots, np.int32)  # out of range: none
            snapshot_to = np.full((rows,), self.snapshots, np.int32)
            for i, (r, n) in enumerate(zip(requests, lengths)):
                tokens = r.tokens
                ids[i, :n] = tokens[r.length:r.length + n]
                following = tokens[r.length + 1:r.length + n + 1]
                next_ids[i, :len(following)] = following
                num_new[i], final[i] = n, r.length + n == len(tokens)
                generated_from[i] = len(r.prompt)  # a recomputed context's generated tokens count for penalties
                if r.restore is not None:
                    restore_from[i] = r.restore
            cached = self._pages_to_cache(requests, lengths, snapshot_to)
            run = self._executable("prefill", rows, chunk)
            batch = self._batch(requests, rows)
            self.caches, first, prompt = run(self.params, self.caches, batch, ids, num_new, next_ids, final,
                                             generated_from, restore_from, snapshot_to)
        except Exception as error:  # noqa: BLE001 - isolated to the requests that cause it
            if snapshot_to is not None and self.scheduler.prefix_cache is not None:  # its snapshot slots go back
                self.scheduler.prefix_cache.free_snapshots += [int(s) for s in snapshot_to if s < self.snapshots]
            self._isolate(self._prefill, requests, error, touched)
            return
        for r in requests:
            r.restore = None
        for key, page, snapshot, next_token in cached:
            self.scheduler.prefix_cache.insert(key, page, snapshot, next_token)
        starts = [r.length for r in requests]
        for r, n in zip(requests, lengths):
            r.length += n  # the prompt's progress is the host's to decide: counted as dispatched
        self._dispatching.append(_Dispatched("prefill", requests, (first, prompt), starts, lengths, final))

    def _pages_to_cache(self, requests: list[Request], lengths: list[int], snapshot_to: np.ndarray) -> list:
        """The prompt pages this chunk completes that the prefix cache lacks, as (key, page, snapshot slot, next
        token); a chunk that ends on a page boundary before its prompt ends also leaves a snapshot of its rings
        there (its slot set in `snapshot_to`). Inserted once the chunk is dispatched."""
        cache, page_tokens = self.scheduler.prefix_cache, self.config.page_tokens
        if cache is None:
            return []
        cached = []
        for i, (r, n) in enumerate(zip(requests, lengths)):
            tokens, start, end, keys = r.tokens, r.length, r.length + n, self.scheduler.page_keys(r)
            for page in range(start // page_tokens, end // page_tokens):
                key, boundary = keys[page], (page + 1) * page_tokens
                if key in cache.entries or any(key == c[0] for c in cached):
                    continue
                snapshot = None
                if boundary == end < len(tokens):
                    snapshot, freed = cache.take_snapshot()
                    self.scheduler.allocator.release(freed)
                    if snapshot is not None:
                        snapshot_to[i] = snapshot
                cached.append((key, r.pages[page], snapshot, tokens[boundary] if boundary < len(tokens) else None))
        return cached

    def _decode(self, requests: list[Request], touched) -> None:
        try:
            rows = bucket_for(len(requests), self.decode_buckets)
            active = np.arange(rows) < len(requests)
            run = self._executable("decode", rows)
            self.caches, out = run(self.params, self.caches, self._batch(requests, rows), active)
        except Exception as error:  # noqa: BLE001 - isolated to the requests that cause it
            self._isolate(self._decode, requests, error, touched)
            return
        self._dispatching.append(_Dispatched("decode", requests, out))

    def _collect(self, dispatched: "_Dispatched", touched) -> None:
        """Read a dispatched step back and commit what each request still running got from it."""
        # A step that fails on the device after its dispatch has written caches that later steps already read:
        # nothing can continue, and the error stops the engine (SERVING §D.1).
        outputs = jax.device_get(dispatched.outputs)
        for i, r in enumerate(dispatched.requests):
            if r.finished:  # ended (stop, length, abort) after this step was dispatched: its row is spare
                continue
            try:
                if dispatched.kind == "prefill":
                    self._commit_prefill(r, *outputs, i, dispatched.starts[i], dispatched.lengths[i],
                                         dispatched.final[i], touched)
                else:
                    count = int(outputs.count[i])
                    r.length += count  # the pending token and the accepted drafts are now processed
                    if self.config.speculative_steps:
                        self.counters["speculative_rounds"] += 1
                        self.counters["drafted_tokens"] += self.config.speculative_steps
                        self.counters["accepted_tokens"] += count - 1
                    self._commit(r, outputs, i, count)
                    touched[r.id] = r
            except Exception as error:  # noqa: BLE001
                self._fail(r, error, touched)

    def _commit_prefill(self, r: Request, first, prompt, row: int, start: int, n: int, final: bool,
                        touched) -> None:
        if r.sampling.prompt_logprobs is not None:
            # Entry p is log p(prompt[p] | prompt[:p]), from chunk position p − 1; a recomputed prompt (after a
            # preemption) adds only the entries not recorded yet.
            if start == 0 and not r.prompt_logprobs:
                r.prompt_logprobs.append(None)
                r.prompt_top_logprobs.append(None)
            count = min(n, len(r.prompt) - 1 - start)  # positions whose next token is in the prompt
            for j in range(max(0, len(r.prompt_logprobs) - start - 1), count):
                r.prompt_logprobs.append(float(prompt.logprobs[row, j]))
                r.prompt_top_logprobs.append(_top(prompt, row, j, r.sampling.prompt_logprobs))
        if final:  # a request mid-prompt has nothing to report yet
            self._commit(r, first, row, 1)
            touched[r.id] = r

    def _commit(self, r: Request, out, row: int, count: int) -> None:
        """Append emitted tokens until a stop condition."""
        eos = self.model_config.eos_token_id
        for j in range(count):
            token = int(out.tokens[row, j])
            if (token == eos and not r.sampling.ignore_eos) or token in r.sampling.stop_token_ids:
                r.finish_reason = "stop"
                break
            r.output.append(token)
            if r.sampling.logprobs is not None:
                r.logprobs.append(float(out.logprobs[row, j]))
                r.top_logprobs.append(_top(out, row, j, r.sampling.logprobs))
            if len(r.output) >= r.sampling.max_tokens:
                r.finish_reason = "length"
                break
        text = self.tokenizer.decode(r.output)
        for stop in r.sampling.stop:
            at = text.find(stop)
            if at >= 0:
                text, r.finish_reason = text[:at], "stop"
        r.text = text

    def _output(self, r: Request) -> RequestOutput:
        # Hold back text that may still become a stop string or an incomplete UTF-8 character.
        end = len(r.text)
        if not r.finished:
            end -= max((len(s) - 1 for s in r.sampling.stop), default=0)
            while end > r.text_sent and r.text[end - 1] == "\ufffd":
                end -= 1
        end = max(end, r.text_sent)
        new = slice(r.tokens_sent, len(r.output))
        wants = r.sampling.logprobs is not None
        send_prompt = not r.prompt_sent and r.sampling.prompt_logprobs is not None and not r.prefilling
        output = RequestOutput(
            request_id=r.id, token_ids=r.output[new], text=r.text[r.text_sent:end],
            logprobs=r.logprobs[new] if wants else None, top_logprobs=r.top_logprobs[new] if wants else None,
            prompt_logprobs=r.prompt_logprobs if send_prompt else None,
            prompt_top_logprobs=r.prompt_top_logprobs if send_prompt else None,
            finished=r.finished, finish_reason=r.finish_reason, num_prompt_tokens=len(r.prompt),
            num_output_tokens=len(r.output), error=r.error, num_cached_tokens=r.cached_tokens or 0)
        r.text_sent, r.tokens_sent, r.prompt_sent = end, len(r.output), r.prompt_sent or send_prompt
        return output

    # ---- compiled executables ---------------------------------------------------------------------------------

    def _executable(self, kind: str, rows: int, chunk: int | None = None):
        key = (kind, rows, chunk)
        executable = self._executables.get(key)
        if executable is None:
            future, mine = self._claim(key)
            if mine:
                self._finish_compile(key, future, self._lower_claimed(key, future))
            executable = future.result()  # compiled here, or by the warm-up that claimed it first
        return executable

    def _claim(self, key) -> tuple[concurrent.futures.Future, bool]:
        """The future of `key`'s executable, and whether the caller is the one to compile it."""
        with self._compile_lock:
            future = self._compiling.get(key)
            if future is not None:
                return future, False
            future = self._compiling[key] = concurrent.futures.Future()
            return future, True

    def _lower_claimed(self, key, future, record=None):
        """Lower a bucket the caller has claimed (its lowering time into `record`); a failure settles the claim."""
        try:
            began = time.perf_counter()
            lowered = self.lower(*key)
        except BaseException as error:
            self._settle(key, future, error=error)
            raise
        if record is not None:
            record["lower_s"] = time.perf_counter() - began
        return lowered

    def _finish_compile(self, key, future, lowered, record=None, report=None):
        try:
            began = time.perf_counter()
            executable = lowered.compile()
        except BaseException as error:
            self._settle(key, future, error=error)
            raise
        if record is not None:
            record["compile_s"] = time.perf_counter() - began
            report(record)
        self._settle(key, future, executable=executable)
        return executable

    def _settle(self, key, future, executable=None, error=None) -> None:
        with self._compile_lock:
            if error is None:
                self._executables[key] = executable
            else:  # not kept: the next caller tries again and sees the error itself
                del self._compiling[key]
        if error is None:
            future.set_result(executable)
        else:
            future.set_exception(error)

    def lower(self, kind: str, rows: int, chunk: int | None = None):
        """The lowered step of one bucket ("prefill" rows × chunk, or "decode" rows); `.compile()` gives the
        executable (callers may compile several at once in threads)."""
        batch = self._batch([], rows)
        donate = () if jax.default_backend() == "cpu" else (1,)  # XLA:CPU cannot reuse donated buffers
        if kind == "prefill":
            function = functools.partial(prefill_step, self.runner, prompt_logprobs=self.config.prompt_logprobs)
            ids, lengths = np.zeros((rows, chunk), np.int32), np.zeros((rows,), np.int32)
            example = (batch, ids, lengths, ids, np.zeros((rows,), bool), lengths, lengths, lengths)
        else:
            steps = self.config.speculative_steps
            function = (functools.partial(speculative_step, self.runner, steps=steps) if steps
                        else functools.partial(decode_step, self.runner))
            example = (batch, np.zeros((rows,), bool))
        return jax.jit(function, donate_argnums=donate).lower(self.params, self.caches, *example)


@dataclasses.dataclass
class _Dispatched:
    """A device step on its way: the requests of its rows and its outputs (device arrays), read back later."""

    kind: str  # "prefill" or "decode"
    requests: list[Request]
    outputs: object  # prefill: (first Emitted, prompt Emitted or None); decode: Emitted
    starts: list[int] | None = None  # prefill: each row's chunk start
    lengths: list[int] | None = None  # prefill: each row's chunk length
    final: np.ndarray | None = None  # prefill: rows whose prompt ends in this chunk


def _bucket_name(key) -> str:
    kind, rows, chunk = key
    return f"{kind}-{rows}x{chunk or 1}"


def _top(out, row: int, column: int, count: int) -> list[tuple[int, float]]:
    return [(int(out.top_ids[row, column, i]), float(out.top_logprobs[row, column, i])) for i in range(count)]


def _join(request_id: str, prompt: list[int], parts: list[RequestOutput]) -> Completion:
    def joined(field):
        values = [getattr(p, field) for p in parts]
        return None if all(v is None for v in values) else [x for v in values if v for x in v]

    prompt_part = next((p for p in parts if p.prompt_logprobs is not None), None)
    return Completion(request_id=request_id, prompt_token_ids=prompt, token_ids=joined("token_ids") or [],
                      text="".join(p.text for p in parts), finish_reason=parts[-1].finish_reason,
                      logprobs=joined("logprobs"), top_logprobs=joined("top_logprobs"),
                      prompt_logprobs=prompt_part.prompt_logprobs if prompt_part else None,
                      prompt_top_logprobs=prompt_part.prompt_top_logprobs if prompt_part else None,
                      num_cached_tokens=parts[-1].num_cached_tokens)
