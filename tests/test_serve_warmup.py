"""Warm-up behind the first requests (SERVING §D.4): the engine serves while a background thread compiles its
shape buckets; a step that needs a bucket compiles it or waits for the warm-up compiling it, never twice."""

import collections
import threading

import numpy as np
import pytest

from dsv4jax.serve.__main__ import build_parser
from dsv4jax.serve.engine import Engine, EngineConfig
from dsv4jax.serve.sampling import SamplingParams
from engine_models import random_model

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)
# Four buckets: prefill 1×16 and 1×64, decode 1 and 2.
CONFIG = EngineConfig(max_running_requests=2, max_model_len=256, page_tokens=128, prefill_chunk=64,
                      prefill_buckets=(16, 64), max_prefill_rows=1, decode_buckets=(1, 2))


def counting_engine(fail_once=()):
    """An engine whose `lower` counts calls per bucket (and raises once for each bucket in `fail_once`)."""
    engine = Engine(random_model(), CONFIG)
    calls, lock, lower = collections.Counter(), threading.Lock(), engine.lower

    def counted(*key):
        with lock:
            calls[key] += 1
            first = calls[key] == 1
        if first and key in fail_once:
            raise RuntimeError(f"injected lowering failure of {key}")
        return lower(*key)

    engine.lower = counted
    return engine, calls


def test_background_warmup_serves_at_once_and_compiles_each_bucket_once():
    engine, calls = counting_engine()
    assert engine.bucket_keys()[:2] == [("prefill", 1, 16), ("decode", 1, None)]  # what a short first request runs
    rng = np.random.default_rng()
    prompt = rng.integers(3, 256, size=int(rng.integers(17, 64))).tolist()  # the 64 chunk: not the warm-up's first
    thread = engine.warmup_in_background()
    during = engine.generate([prompt], GREEDY)[0]
    thread.join(300)
    assert not thread.is_alive()
    assert engine.compiles == 4 and set(calls) == set(engine.bucket_keys()), calls
    assert all(n == 1 for n in calls.values()), f"a bucket was lowered twice: {calls}"
    assert engine.warmup() == []  # nothing left
    after = engine.generate([prompt], GREEDY)[0]
    assert during.token_ids == after.token_ids and during.logprobs == after.logprobs


def test_a_failed_background_compile_is_retried_by_the_step_that_needs_it(caplog):
    engine, calls = counting_engine(fail_once={("decode", 2, None)})
    thread = engine.warmup_in_background()
    thread.join(300)
    assert "background warm-up stopped" in caplog.text
    assert engine.compiles == 3
    rng = np.random.default_rng()
    prompts = [rng.integers(3, 256, size=n).tolist() for n in (5, 9)]
    completions = engine.generate(prompts, GREEDY)  # decodes two rows: compiles the bucket that failed
    assert [len(c.token_ids) for c in completions] == [GREEDY.max_tokens] * 2
    assert engine.compiles == 4 and calls[("decode", 2, None)] == 2


@pytest.mark.parametrize("argv, mode", [([], "background"), (["--warmup", "full"], "full"),
                                        (["--no-warmup"], "none")])
def test_server_warmup_flag(argv, mode):
    assert build_parser().parse_args(argv).warmup == mode
