"""Pages on demand (SERVING §D.7): requests take cache pages as they grow; when the pool runs short the newest is
preempted and later recomputed from its token ids. Every request then finishes with the tokens it gets alone, and
no page leaks. Also the admission rules (watermark, `reserve`) on the scheduler alone."""

import numpy as np
import pytest

from dsv4jax.serve.engine import Engine, EngineConfig
from dsv4jax.serve.sampling import SamplingParams
from dsv4jax.serve.scheduler import Request, Scheduler
from engine_models import drafting_model, random_model

# 5 pages of 128 positions: four requests of ~100-token prompts fit at admission (one page each), but each needs a
# second and a third page as it decodes, so they cannot all run at once.
SMALL_POOL = dict(max_running_requests=4, max_model_len=512, page_tokens=128, num_pages=6, prefill_chunk=64,
                  prefill_buckets=(64,), max_prefill_rows=2, prefill_row_buckets=(2,), decode_buckets=(4,))


def requests(rng):
    prompts = [rng.integers(3, 256, size=int(n)).tolist() for n in rng.integers(90, 120, size=4)]
    penalties = dict(frequency_penalty=0.4, presence_penalty=0.3, repetition_penalty=1.2)
    sampling = [SamplingParams(max_tokens=int(rng.integers(150, 200)), temperature=0.0, ignore_eos=True, logprobs=0,
                               prompt_logprobs=0 if i == 3 else None, **(penalties if i % 2 else {}))
                for i in range(4)]
    return prompts, sampling


@pytest.mark.parametrize("steps", [0, 2])
def test_preempted_requests_finish_with_the_tokens_they_get_alone(steps):
    model = drafting_model(residual_scale=0.15) if steps else random_model()
    engine = Engine(model, EngineConfig(speculative_steps=steps, **SMALL_POOL))
    prompts, sampling = requests(np.random.default_rng())
    together = engine.generate(prompts, sampling)
    preempted = engine.counters["preempted"]
    assert preempted >= 1, "the pool was meant to run short: nothing was preempted, so nothing was tested"
    stats = engine.stats()
    assert stats["pages_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
    assert engine.scheduler.available() == engine.scheduler.allocator.total  # free, or cached and unused
    for prompt, params, got in zip(prompts, sampling, together):
        alone = engine.generate([prompt], params)[0]
        assert got.token_ids == alone.token_ids and len(got.token_ids) == params.max_tokens
        np.testing.assert_allclose(got.logprobs, alone.logprobs, atol=1e-4)
        if params.prompt_logprobs is not None:
            assert len(got.prompt_logprobs) == len(prompt) and got.prompt_logprobs[0] is None
            np.testing.assert_allclose(got.prompt_logprobs[1:], alone.prompt_logprobs[1:], atol=1e-4)
    assert engine.counters["preempted"] == preempted, "a request alone was preempted: it fits the pool"
    # The penalties mattered, so their counts were rebuilt from the recomputed tokens, not just left at zero.
    plain = [engine.generate([p], SamplingParams(max_tokens=s.max_tokens, temperature=0.0, ignore_eos=True))[0]
             for p, s in zip(prompts, sampling) if s.frequency_penalty]
    penalised = [got for got, s in zip(together, sampling) if s.frequency_penalty]
    assert any(a.token_ids != b.token_ids for a, b in zip(plain, penalised))


def scheduler(on_demand: bool, watermark: float = 0.0, pages: int = 11) -> Scheduler:
    return Scheduler(num_slots=4, num_pages=pages, page_tokens=128, pages_per_sequence=4, max_model_len=512,
                     overhang=0, max_waiting=8, on_demand=on_demand, watermark=watermark)


def waiting(s: Scheduler, count: int, prompt: int = 100, max_tokens: int = 300) -> list[Request]:
    batch = [Request(id=f"r{i}", prompt=[3] * prompt, sampling=SamplingParams(max_tokens=max_tokens), seed=0,
                     arrival=float(i)) for i in range(count)]
    s.waiting.extend(batch)
    return batch


def test_admission_reserves_all_or_the_prompt_and_keeps_a_watermark():
    reserve = scheduler(on_demand=False)  # 10 pages; each request can need ceil(400 / 128) = 4
    waiting(reserve, 4)
    assert len(reserve.admit()) == 2 and reserve.allocator.free == 2
    on_demand = scheduler(on_demand=True)  # one page each for a 100-token prompt and its first step
    waiting(on_demand, 4)
    assert len(on_demand.admit()) == 4 and on_demand.allocator.free == 6
    # A watermark of 30% of 5 pages keeps 2 free while anything runs: 3 of the 4 requests are admitted.
    tight = scheduler(on_demand=True, watermark=0.3, pages=6)
    waiting(tight, 4)
    assert len(tight.admit()) == 3 and tight.allocator.free == 2
    alone = scheduler(on_demand=True, watermark=0.5, pages=3)  # nothing runs: the watermark does not apply
    waiting(alone, 1, prompt=200)
    assert len(alone.admit()) == 1 and alone.allocator.free == 0


def test_growth_and_preemption_return_every_page():
    s = scheduler(on_demand=True, pages=6)  # 5 pages
    first, second = waiting(s, 2)
    s.admit()
    s.grow(first, 300)  # 3 pages now
    assert len(first.pages) == 3 and s.pages_short({first.id: 300, second.id: 300}) == 1
    s.grow(first, 10_000)  # never past what the request can need (prompt + max_tokens = 400: 4 pages)
    assert len(first.pages) == 4 and list(s.tables[first.slot]) == first.pages
    second.output = [5, 6]
    assert s.newest_running() is second
    s.preempt(second)
    assert second.slot is None and second.pages == [] and second.length == 0 and s.waiting[0] is second
    assert second.tokens == second.prompt + [5, 6] and second.prefilling
    s.release(first)
    assert s.allocator.free == s.allocator.total and not s.running
