"""The serving engine (dsv4jax/serve/): MTP speculation, continuous batching, paged caches, no recompilation.

Models are tiny and fp32 (tests/engine_models.py); each engine compiles once per module (fixtures).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4jax.run import Runner
from dsv4jax.model import init_state
from dsv4jax.serve.engine import AdmissionError, Engine, EngineConfig
from dsv4jax.serve.sampling import SamplingParams
from engine_models import drafting_model, random_model

GREEDY = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True, logprobs=0)


def full_logprobs(model, ids):
    """log-softmax at every position of one full forward (padded to 512 tokens: one compilation)."""
    padded = np.zeros((1, 512), np.int32)  # one shape for every call: one compilation
    padded[0, :len(ids)] = ids
    state = init_state(model.config, 1, 512)
    logits, _, _ = Runner(model.graphdef).forward(model.params, state, jnp.asarray(padded), jnp.asarray([len(ids)]))
    return np.asarray(jax.nn.log_softmax(logits[0, :len(ids)], axis=-1))


def reference_logprobs(model, prompt, output):
    """log p(output token | everything before) from one full forward over prompt + output."""
    ids = prompt + output
    logprobs = full_logprobs(model, ids)
    rows = np.arange(len(prompt) - 1, len(ids) - 1)
    return logprobs[rows, output], logprobs[rows].argmax(-1)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng()
    lengths = rng.choice(np.arange(1, 260), size=8, replace=False)
    lengths[:2] = [1, 200]  # the shortest prompt, and one whose HCA rows (m=128) complete inside the prompt
    return [rng.integers(3, 256, size=n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def speculative_engines():
    model = drafting_model(residual_scale=0.15)
    engines = {}

    def get(steps):
        if steps not in engines:
            engines[steps] = Engine(model, EngineConfig(
                max_running_requests=8, max_model_len=512, page_tokens=128, prefill_chunk=64, prefill_buckets=(64,),
                max_prefill_rows=8, prefill_row_buckets=(8,), decode_buckets=(8,), speculative_steps=steps))
            engines[steps].warmup()
        return engines[steps]

    return get


@pytest.fixture(scope="module")
def plain_outputs(speculative_engines, prompts):
    return speculative_engines(0).generate(prompts, GREEDY)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_mtp_greedy_equals_plain_greedy(speculative_engines, prompts, plain_outputs, steps):
    engine = speculative_engines(steps)
    before = dict(engine.stats())
    outputs = engine.generate(prompts, GREEDY)
    for plain, spec in zip(plain_outputs, outputs):
        assert len(spec.token_ids) == 200 and spec.token_ids == plain.token_ids
    stats = engine.stats()
    drafted = stats["drafted_tokens"] - before["drafted_tokens"]
    accepted = stats["accepted_tokens"] - before["accepted_tokens"]
    # Both paths of the acceptance rule ran (the drafting model agrees with itself often, not always).
    assert 0.2 < accepted / drafted < 0.98, (accepted, drafted)
    assert stats["pages_used"] == 0 and stats["running"] == 0
    # The committed state is exact: the logprobs reported while speculating equal a full forward's.
    for prompt, out in [(prompts[steps], outputs[steps])]:  # one full forward per case: CPU time
        expected, greedy = reference_logprobs(engine.model, prompt, out.token_ids)
        np.testing.assert_allclose(out.logprobs, expected, atol=5e-5, rtol=0)
        assert greedy.tolist() == out.token_ids


def test_no_recompilation_under_mixed_traffic(speculative_engines):
    """After warm-up, 100 steps of requests arriving, finishing and aborting (chunked prefill beside decode,
    MTP acceptance varying) compile nothing."""
    engine = speculative_engines(2)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration"
        else None)
    rng = np.random.default_rng()
    known_before = engine.compiles
    submitted, finished = [], set()
    for step in range(100):
        if step < 70 and rng.random() < 0.4:
            prompt = rng.integers(3, 256, size=int(rng.integers(1, 180))).tolist()
            sampling = SamplingParams(max_tokens=int(rng.integers(1, 40)), temperature=float(rng.choice([0.0, 0.8])),
                                      top_p=0.9, seed=int(rng.integers(1000)), ignore_eos=True)
            submitted.append(engine.submit(prompt, sampling))
        if step % 23 == 22 and submitted:
            engine.abort(submitted[int(rng.integers(len(submitted)))])
        finished.update(out.request_id for out in engine.step() if out.finished)
    assert engine.compiles == known_before
    assert compiles == [], f"{len(compiles)} XLA compilations in steady state"
    while engine.has_unfinished():
        finished.update(out.request_id for out in engine.step() if out.finished)
    assert finished == set(submitted)
    assert engine.stats()["pages_used"] == 0


@pytest.mark.parametrize("steps", [0, 2])
def test_overlap_reads_each_step_back_while_the_next_runs_and_changes_no_token(speculative_engines, prompts,
                                                                               steps):
    """With overlap the host reads step N back only once step N+1 is dispatched (SERVING §D.5): every read has
    a step in flight, and the tokens, logprobs, texts and finish reasons equal
    those read back one step at a time, with stops by token and by length ending requests mid-batch."""
    engine = speculative_engines(steps)
    rng = np.random.default_rng()
    sampling = [SamplingParams(max_tokens=int(rng.integers(1, 40)), temperature=float(t), seed=int(seed),
                               ignore_eos=True, logprobs=0) for t, seed in zip(rng.choice([0.0, 0.9], 8),
                                                                                rng.integers(1000, size=8))]
    plain = dataclasses.replace(engine.config, overlap=False)
    overlapped = engine.config
    assert overlapped.overlap
    in_flight = []
    collect = engine._collect

    def spy(dispatched, touched):
        in_flight.append((engine.counters["steps"], len(engine._in_flight)))
        return collect(dispatched, touched)

    engine._collect = spy
    try:
        engine.config = plain
        free = engine.generate(prompts, sampling)
        # Stop at a token each request really emits, for half of them.
        sampling = [dataclasses.replace(s, stop_token_ids=(out.token_ids[len(out.token_ids) // 2],)) if i % 2 else s
                    for i, (s, out) in enumerate(zip(sampling, free))]
        one_at_a_time = engine.generate(prompts, sampling)
        assert all(n == 0 for _, n in in_flight)
        in_flight.clear()
        engine.config = overlapped
        outputs = engine.generate(prompts, sampling)
    finally:
        engine.config = overlapped
        del engine._collect
    # generate() returns once the last request has finished, which it learns while the next step runs.
    assert all(n > 0 for _, n in in_flight) and len(in_flight) > 10, in_flight
    assert any(out.finish_reason == "stop" for out in outputs)
    for a, b in zip(outputs, one_at_a_time):
        assert (a.token_ids, a.logprobs, a.text, a.finish_reason) == (b.token_ids, b.logprobs, b.text,
                                                                      b.finish_reason)
    assert engine.stats()["pages_used"] == 0
    assert engine.step() == [] and not engine.has_unfinished()  # the last, spare step read back


def test_rejection_sampling_keeps_the_target_distribution():
    """Chi-square on the first two emitted tokens over a 5-token vocabulary: speculative sampling with a
    poor draft (two rounds when the first draft is rejected) vs the target's own chain p(a | x) p(b | a)."""
    from dsv4jax.serve.sampling import SamplingRows
    from dsv4jax.serve.speculative import accept

    vocab, k, trials = 5, 2, 40000
    rng = np.random.default_rng()
    target = rng.dirichlet(np.ones(vocab) * 0.7, size=vocab)  # p(next | previous)
    draft = rng.dirichlet(np.ones(vocab) * 0.7, size=vocab)  # q(next | previous), unrelated
    rows = SamplingRows.from_params([SamplingParams(temperature=1.0)] * trials, rng.integers(2**31, size=trials).tolist())

    def first_two(accept_rule):
        previous = np.zeros(trials, int)  # x_L = token 0 for every trial
        emitted = [[] for _ in range(trials)]
        position = 100
        while min(len(e) for e in emitted) < 2:
            drafts, q_rows, context = [], [], previous
            for _ in range(k):
                q = draft[context]
                token = (q.cumsum(1) > rng.random((trials, 1))).argmax(1)
                drafts.append(token)
                q_rows.append(q)
                context = token
            contexts = [previous] + drafts  # verify position i is conditioned on the token before it
            p_rows = np.stack([target[c] for c in contexts], axis=1)
            tokens, accepted = accept_rule(jnp.asarray(np.stack(drafts, 1), jnp.int32),
                                           jnp.asarray(np.stack(q_rows, 1), jnp.float32),
                                           jnp.asarray(p_rows, jnp.float32), rows, jnp.full((trials,), position))
            tokens, accepted = np.asarray(tokens), np.asarray(accepted)
            for t in range(trials):
                emitted[t].extend(tokens[t, :accepted[t] + 1].tolist())
            previous = np.array([e[-1] for e in emitted])
            position += k + 1
        pairs = np.array([e[:2] for e in emitted])
        return np.bincount(pairs[:, 0] * vocab + pairs[:, 1], minlength=vocab * vocab)

    expected = (target[0][:, None] * target).reshape(-1) * trials

    def chi_square(counts):
        return float(np.sum((counts - expected) ** 2 / expected))

    # 24 degrees of freedom: the 99.9% quantile is 51.2.
    assert chi_square(first_two(accept)) < 51.2

    def accept_everything(drafts, q, p, rows, position):  # a biased rule: the test must catch it
        tokens = jnp.concatenate([drafts, drafts[:, -1:]], axis=1)
        return tokens, jnp.full((drafts.shape[0],), drafts.shape[1] - 1)

    assert chi_square(first_two(accept_everything)) > 51.2 * 4


@pytest.fixture(scope="module")
def batching_engine():
    engine = Engine(random_model(), EngineConfig(max_running_requests=8, max_model_len=384, page_tokens=128,
                                                 num_pages=12, prefill_chunk=64, prefill_buckets=(16, 64),
                                                 max_prefill_rows=2, prefill_row_buckets=(2,), decode_buckets=(2,)))
    engine.warmup()
    return engine


def test_continuous_batching_equals_each_alone(batching_engine):
    engine = batching_engine
    rng = np.random.default_rng()
    prompts = [rng.integers(3, 256, size=int(n)).tolist() for n in rng.integers(1, 300, size=32)]
    sampling = [SamplingParams(max_tokens=int(n), temperature=0.0, ignore_eos=True)
                for n in rng.integers(1, 24, size=32)]
    ids = [engine.submit(p, s) for p, s in zip(prompts, sampling)]
    outputs = {rid: [] for rid in ids}
    steps = 0
    while engine.has_unfinished():
        if steps == 3:  # a request that can never fit is refused; the others go on
            with pytest.raises(AdmissionError, match="max_model_len"):
                engine.submit([3] * 300, SamplingParams(max_tokens=100))
        for out in engine.step():
            outputs[out.request_id] += out.token_ids
        steps += 1
    assert engine.stats()["pages_used"] == 0 and engine.stats()["running"] == 0
    for rid, prompt, params in zip(ids, prompts, sampling):
        alone = engine.generate([prompt], params)[0]
        assert outputs[rid] == alone.token_ids and len(alone.token_ids) == params.max_tokens


def test_seeded_sampling_is_reproducible_and_batch_independent(batching_engine):
    engine = batching_engine
    rng = np.random.default_rng()
    prompt = rng.integers(3, 256, size=40).tolist()
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, top_p=0.95, min_p=0.01, seed=1234,
                            ignore_eos=True)
    alone = engine.generate([prompt], params)[0].token_ids
    others = [rng.integers(3, 256, size=int(n)).tolist() for n in (7, 90, 33)]
    batch = engine.generate(others[:2] + [prompt] + others[2:], [params] * 4)
    assert batch[2].token_ids == alone
    other_seed = engine.generate([prompt], dataclasses.replace(params, seed=99))[0].token_ids
    assert other_seed != alone  # 12 tokens from a near-uniform random model: equal by chance ~never
    greedy = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    top1 = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=1.5, top_k=1, ignore_eos=True))[0]
    assert top1.token_ids == greedy.token_ids


def test_prompt_logprobs_stop_strings_and_abort(batching_engine):
    engine = batching_engine
    rng = np.random.default_rng()
    prompt = rng.integers(3, 256, size=150).tolist()  # three prefill chunks
    out = engine.generate([prompt], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, logprobs=3,
                                                   prompt_logprobs=2))[0]
    logprobs = full_logprobs(engine.model, prompt + out.token_ids)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    np.testing.assert_allclose(out.prompt_logprobs[1:], logprobs[np.arange(len(prompt) - 1), prompt[1:]], atol=2e-5)
    top = out.prompt_top_logprobs[5]
    assert [t for t, _ in top] == np.argsort(-logprobs[4])[:2].tolist()
    assert len(out.top_logprobs) == 30 and all(len(t) == 3 for t in out.top_logprobs)

    # Stop strings: the text ends right before the first occurrence and the request stops there.
    text = out.text
    stop = text[10:13]
    assert len(stop) == 3
    stopped = engine.generate([prompt], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True,
                                                       stop=(stop,)))[0]
    assert stopped.finish_reason == "stop" and stopped.text == text[:text.find(stop)]
    token = out.token_ids[7]
    by_token = engine.generate([prompt], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True,
                                                        stop_token_ids=(token,)))[0]
    assert by_token.finish_reason == "stop" and by_token.token_ids == out.token_ids[:out.token_ids.index(token)]

    # Abort mid-generation frees the pages and reports "abort".
    rid = engine.submit(prompt, SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
    for _ in range(6):
        engine.step()
    assert engine.stats()["pages_used"] > 0
    engine.abort(rid)
    final = [o for o in engine.step() if o.request_id == rid]
    assert final and final[0].finish_reason == "abort" and final[0].finished
    assert engine.stats()["pages_used"] == 0 and not engine.has_unfinished()


def test_bad_requests_and_configs_are_refused_clearly(batching_engine):
    engine = batching_engine
    with pytest.raises(AdmissionError, match="empty"):
        engine.submit([], SamplingParams())
    with pytest.raises(AdmissionError, match="outside the vocabulary"):
        engine.submit([3, 999], SamplingParams())
    with pytest.raises(AdmissionError, match="temperature"):
        engine.submit([3], SamplingParams(temperature=-1))
    with pytest.raises(AdmissionError, match="top_p"):
        engine.submit([3], SamplingParams(top_p=0))
    with pytest.raises(AdmissionError, match="cache pages"):  # fits max_model_len, not the 12-page pool
        Engine(random_model(), EngineConfig(max_model_len=384, page_tokens=128, num_pages=2)).submit(
            [3] * 10, SamplingParams(max_tokens=300))
    from dsv4jax.config import ConfigError
    with pytest.raises(ConfigError, match="page_tokens"):
        Engine(random_model(), EngineConfig(page_tokens=100))
    with pytest.raises(ConfigError, match="speculative_steps"):
        Engine(random_model(), EngineConfig(speculative_steps=5))
    assert not engine.has_unfinished() and engine.stats()["pages_used"] == 0


@pytest.mark.parametrize("mesh, cp_mode, steps", [("cp=2,tp=2,ep=2", "round_robin", 1), ("cp=4,ep=2", "zigzag", 2)])
def test_engine_over_a_mesh_equals_one_device(speculative_engines, mesh, cp_mode, steps):
    """8 fake CPU devices: prompt chunks split over cp (MTP prefill too), MoE over cp × ep and tp, decode and
    speculative verify replicated over cp. Same greedy tokens and logprobs as one device."""
    from dsv4jax.sharding.mesh import MeshError, parse_mesh_spec

    one_device = speculative_engines(steps)  # compiled already by the tests above
    model, config = one_device.model, one_device.config
    rng = np.random.default_rng()
    prompts = [rng.integers(3, 256, size=int(n)).tolist() for n in (1, 63, 150, 40)]
    sampling = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=0)
    alone = one_device.generate(prompts, sampling)
    sharded = Engine(model, config, mesh=parse_mesh_spec(mesh, cp_mode=cp_mode))
    for a, b in zip(alone, sharded.generate(prompts, sampling)):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-5)
    assert sharded.stats()["accepted_tokens"] > 0
    with pytest.raises(MeshError, match="use dp=1"):
        Engine(model, config, mesh="dp=2,ep=4")
    from dsv4jax.config import ConfigError
    with pytest.raises(ConfigError, match="multiples of 8"):
        Engine(model, dataclasses.replace(config, prefill_chunk=60, prefill_buckets=(60,)),
               mesh=parse_mesh_spec("cp=4,ep=2", cp_mode="zigzag"))
