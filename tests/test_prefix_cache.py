"""Prefix caching (SERVING §D.8): a request whose prompt starts with a cached prefix resumes from that prefix's
pages and ring snapshot, and gets the same tokens and logprobs as without the cache; prefix lengths on and off
page boundaries, MTP on and off, over a context-parallel mesh; eviction under a small pool returns every page."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from dsv4jax.serve.engine import Engine, EngineConfig
from dsv4jax.serve.prefix_cache import PrefixCache
from dsv4jax.serve.sampling import SamplingParams
from engine_models import drafting_model, random_model

# 6 pages of 128 positions and 3 snapshot slots: two running requests of ~320 tokens fill the pool, so the cache
# must evict what no running request uses.
BASE = dict(max_running_requests=2, max_model_len=512, page_tokens=128, num_pages=7, prefix_cache_snapshots=3,
            prefill_chunk=64, prefill_buckets=(64,), max_prefill_rows=2, prefill_row_buckets=(2,), decode_buckets=(2,))


def greedy(tokens: int = 8, **extra):
    return SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, logprobs=0, **extra)


def full_prefill(engine, prompt, sampling):
    """The same request prefilled from position 0: a request asking for prompt logprobs never uses the cache."""
    [full] = engine.generate([prompt], dataclasses.replace(sampling, prompt_logprobs=0))
    assert full.num_cached_tokens == 0
    return full


@functools.cache
def engine(steps: int, mesh=None) -> Engine:
    model = drafting_model(residual_scale=0.15) if steps else random_model()
    return Engine(model, EngineConfig(speculative_steps=steps, **BASE), mesh=mesh,
                  devices=None if mesh is None else jax.devices()[:2])


@pytest.mark.parametrize("steps,mesh", [(0, None), (2, None), (0, "cp=2")])
def test_a_prefix_hit_gives_the_tokens_of_a_full_prefill(steps, mesh):
    cached = engine(steps, mesh)
    hits_before = cached.stats()["prefix_cache_hits"]
    rng = np.random.default_rng()
    system = rng.integers(3, 256, size=300).tolist()
    first = cached.generate([system + rng.integers(3, 256, size=20).tolist()], greedy())[0]
    assert first.num_cached_tokens == 0
    # Shared prefixes of 300 (hit at 256), 130 (hit at 128), exactly 256 (with MTP the snapshot at 256 has seen
    # the first request's token 256, so the hit is at 128), and 100 (no full page: no hit).
    for shared, expect in ((300, 256), (130, 128), (256, 128 if steps else 256), (100, 0)):
        suffix = rng.integers(3, 256, size=int(rng.integers(5, 60))).tolist()
        suffix[0] = 4 if shared < len(system) and system[shared] == 3 else 3  # the prompts part right at `shared`
        prompt = system[:shared] + suffix
        [hit] = cached.generate([prompt], greedy())
        full = full_prefill(cached, prompt, greedy())
        assert hit.num_cached_tokens == expect, shared
        assert hit.token_ids == full.token_ids
        np.testing.assert_allclose(hit.logprobs, full.logprobs, atol=1e-4)
    stats = cached.stats()
    assert stats["prefix_cache_hits"] - hits_before == 256 + 128 + (128 if steps else 256) + 0
    assert stats["prefix_cache_queries"] >= len(first.prompt_token_ids)


def test_requests_sharing_a_prefix_at_once_and_eviction_under_a_small_pool():
    cached = engine(0)
    rng = np.random.default_rng()
    systems = [rng.integers(3, 256, size=int(n)).tolist() for n in (260, 200, 300)]
    prompts = [s + rng.integers(3, 256, size=int(rng.integers(5, 40))).tolist() for _ in range(2) for s in systems]
    sampling = [greedy(int(rng.integers(4, 30)), frequency_penalty=0.5) for _ in prompts]
    for _ in range(2):  # the second round hits what the first cached, unless it was evicted
        for got, prompt, params in zip(cached.generate(prompts, sampling), prompts, sampling):
            want = full_prefill(cached, prompt, params)
            assert got.token_ids == want.token_ids
            np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)
    # The last prompts' prefix is the most recently used: alone, a new request sharing it hits.
    prompt = systems[-1] + [7, 8, 9]
    [hit] = cached.generate([prompt], sampling[0])
    assert hit.num_cached_tokens == 256 and hit.token_ids == full_prefill(cached, prompt, sampling[0]).token_ids
    scheduler = cached.scheduler
    assert not scheduler.running and all(count == 0 for count in scheduler.prefix_cache.users.values())
    cached_pages = len(scheduler.prefix_cache.entries)
    assert scheduler.allocator.free + cached_pages == scheduler.allocator.total
    assert cached_pages <= 6 and len(scheduler.prefix_cache.free_snapshots) + sum(
        e.snapshot is not None for e in scheduler.prefix_cache.entries.values()) == 3


def test_prefix_index_chains_pages_and_evicts_least_recently_used():
    cache = PrefixCache(page_tokens=4, num_snapshots=2, match_next_token=True)
    tokens = list(range(20))
    keys = PrefixCache.keys(tokens, 4, 3)
    cache.insert(keys[0], page=7, snapshot=None, next_token=4)
    cache.insert(keys[1], page=8, snapshot=cache.take_snapshot()[0], next_token=8)
    cache.insert(keys[2], page=9, snapshot=cache.take_snapshot()[0], next_token=12)
    assert cache.take_snapshot() == (None, [])  # both snapshots' pages are in use by their owner
    assert cache.unuse([7, 8, 9, 3]) == [3]
    hit = cache.lookup(tokens, limit=19)
    assert (hit.tokens, hit.pages) == (12, [7, 8, 9])
    assert cache.lookup(tokens[:12] + [99], limit=12).tokens == 8  # the MTP snapshot at 12 saw token 12
    assert cache.lookup([1] + tokens[1:], limit=19) is None  # another first page: nothing shared
    cache.unuse([7, 8, 9, 7, 8])
    assert cache.evictable() == 3
    cache.lookup(tokens, limit=8)  # pages 7 and 8 become the most recent
    cache.unuse([7, 8])
    slot, freed = cache.take_snapshot()  # evicts page 9, the least recently used, and its snapshot
    assert freed == [9] and slot is not None and keys[2] not in cache.entries
