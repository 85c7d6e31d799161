"""A request's tokens and logprobs beside other requests equal those it gets alone (SERVING §D.6): exactly in the
deterministic mode (one shape per step kind) in bfloat16, to 1e-5 in float32 with the shape buckets; MTP on and
off; companions longer than a prefill chunk, short ones, and ones that arrive while it decodes."""

import numpy as np
import pytest

from dsv4jax.config import ConfigError
from dsv4jax.serve.engine import Engine, EngineConfig
from dsv4jax.serve.sampling import SamplingParams
from engine_models import random_model

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)
BASE = dict(max_running_requests=4, max_model_len=512, page_tokens=128, prefill_chunk=64, max_prefill_rows=2)


def alone_and_beside(engine):
    """(alone, beside companions given at once, beside companions arriving mid-decode) for one fresh request."""
    rng = np.random.default_rng()
    target = rng.integers(3, 256, size=int(rng.integers(20, 60))).tolist()
    companions = [rng.integers(3, 256, size=int(n)).tolist() for n in (150, 3, 40)]  # 150: three chunks
    alone = engine.generate([target], GREEDY)[0]
    beside = engine.generate([companions[0], target, *companions[1:]], GREEDY)[1]
    rid = engine.submit(target, GREEDY)
    tokens, logprobs, step = [], [], 0
    while engine.has_unfinished():
        if step == 3:  # prefill of the companions beside the target's decode
            for prompt in companions:
                engine.submit(prompt, GREEDY)
        for out in engine.step():
            if out.request_id == rid:
                tokens += out.token_ids
                logprobs += out.logprobs
        step += 1
    return alone, beside, (tokens, logprobs)


@pytest.mark.parametrize("steps", [0, 1])
def test_deterministic_mode_is_exact_in_bfloat16(steps):
    engine = Engine(random_model(dtype="bfloat16"), EngineConfig(**BASE, speculative_steps=steps,
                                                                 deterministic=True))
    alone, beside, arriving = alone_and_beside(engine)
    assert len(alone.token_ids) == GREEDY.max_tokens
    assert beside.token_ids == alone.token_ids and beside.logprobs == alone.logprobs
    assert arriving == (alone.token_ids, alone.logprobs)
    assert engine.compiles == 2  # one prefill shape, one decode shape


def test_shape_buckets_are_batch_invariant_to_1e5_in_float32():
    engine = Engine(random_model(), EngineConfig(**BASE, speculative_steps=1, prefill_buckets=(16, 64),
                                                 decode_buckets=(1, 4)))
    alone, beside, (tokens, logprobs) = alone_and_beside(engine)
    for other_tokens, other_logprobs in ((beside.token_ids, beside.logprobs), (tokens, logprobs)):
        assert other_tokens == alone.token_ids
        np.testing.assert_allclose(other_logprobs, alone.logprobs, atol=1e-5, rtol=0)
    assert engine.compiles > 2  # the comparison crossed shapes


def test_deterministic_mode_takes_no_buckets():
    with pytest.raises(ConfigError, match="deterministic=True .* leave decode_buckets empty"):
        Engine(random_model(), EngineConfig(**BASE, deterministic=True, decode_buckets=(1, 4)))
