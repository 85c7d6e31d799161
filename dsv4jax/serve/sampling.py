"""Sampling parameters of a request (SERVING §D.1) and the jittable logits processing and sampling.

Every request carries its own parameters; a batch holds them as per-row arrays (`SamplingRows`), so one
compiled step serves any mix of greedy and sampled requests. Randomness is a pure function of (seed, position,
purpose): the same seed and prompt give the same output whatever else shares the batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dsv4jax.model.state import pytree_dataclass

MAX_TOP_LOGPROBS = 20  # the most top-logprobs a request may ask for (OpenAI's limit); computed always
INT32_MAX = 2**31 - 1  # top_k and max_tokens live in int32 arrays on the device
# Below these, float32 logits / temperature (or / penalty) overflow to inf and the softmax turns to NaN; the
# limit each one approaches is what is run instead (vLLM treats temperature < 1e-5 as greedy too).
GREEDY_BELOW_TEMPERATURE = 1e-5
MIN_REPETITION_PENALTY = 1e-6

# Purposes folded into a position's key, so that one (seed, position) never reuses a random draw.
SAMPLE, DRAFT, ACCEPT, RESIDUAL = 0, 1, 2, 3


class SamplingError(ValueError):
    """A sampling parameter is out of range; the message names the field and its allowed values."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = -1  # ≤ 0: off
    min_p: float = 0.0
    seed: int | None = None  # None: the engine draws one
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; 0: the chosen token's; n: plus the top n
    prompt_logprobs: int | None = None  # the same for the prompt tokens (echo)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    def validate(self, vocab_size: int) -> None:
        def need(ok: bool, field: str, allowed: str):
            if not ok:
                raise SamplingError(f"{field}={getattr(self, field)!r} is invalid: {allowed}")

        def number(field):
            value = getattr(self, field)
            return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)

        def integer(field):
            value = getattr(self, field)
            return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

        need(integer("max_tokens") and 1 <= self.max_tokens <= INT32_MAX, "max_tokens", "an integer ≥ 1")
        need(number("temperature") and 0 <= self.temperature <= 100, "temperature", "a number in [0, 100]")
        need(number("top_p") and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]")
        need(integer("top_k") and -1 <= self.top_k <= INT32_MAX, "top_k",
             f"an integer in [-1, {INT32_MAX}] (-1 or 0: off; above the vocabulary: off)")
        need(number("min_p") and 0 <= self.min_p <= 1, "min_p", "a number in [0, 1]")
        need(self.seed is None or integer("seed"), "seed", "an integer or null")
        need(isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop), "stop",
             "a list of non-empty strings")
        need(isinstance(self.stop_token_ids, tuple)
             and all(isinstance(t, (int, np.integer)) and 0 <= t < vocab_size for t in self.stop_token_ids),
             "stop_token_ids", f"token ids in [0, {vocab_size})")
        for field in ("logprobs", "prompt_logprobs"):
            value = getattr(self, field)
            need(value is None or (integer(field) and 0 <= value <= MAX_TOP_LOGPROBS), field,
                 f"null or an integer in [0, {MAX_TOP_LOGPROBS}]")
        for field in ("presence_penalty", "frequency_penalty"):
            need(number(field) and -2 <= getattr(self, field) <= 2, field, "a number in [-2, 2]")
        need(number("repetition_penalty") and 0 < self.repetition_penalty <= 10, "repetition_penalty",
             "a number in (0, 10]")


@pytree_dataclass
class SamplingRows:
    """Per-row sampling parameters of a batch, as device arrays [B]."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    presence: jax.Array
    frequency: jax.Array
    repetition: jax.Array
    seed: jax.Array  # uint32

    @staticmethod
    def from_params(params: list[SamplingParams | None], seeds: list[int]) -> "SamplingRows":
        """Rows for a batch; None rows (padding) sample greedily with no penalties."""
        fill = SamplingParams(temperature=0.0)
        rows = [p or fill for p in params]

        def column(get, dtype):
            return np.asarray([get(p) for p in rows], dtype)

        return SamplingRows(temperature=column(lambda p: p.temperature if p.temperature >= GREEDY_BELOW_TEMPERATURE
                                               else 0.0, np.float32),
                            top_k=column(lambda p: min(p.top_k, INT32_MAX), np.int32),
                            # top_p in (0, 1e-38) rounds to 0 in float32, which would keep nothing: keep the top.
                            top_p=np.maximum(column(lambda p: p.top_p, np.float32), np.finfo(np.float32).tiny),
                            min_p=column(lambda p: p.min_p, np.float32),
                            presence=column(lambda p: p.presence_penalty, np.float32),
                            frequency=column(lambda p: p.frequency_penalty, np.float32),
                            repetition=column(lambda p: max(p.repetition_penalty, MIN_REPETITION_PENALTY), np.float32),
                            seed=np.asarray([s % 2**32 for s in seeds], np.uint32))


def apply_penalties(logits: jax.Array, rows: SamplingRows, counts: jax.Array, seen: jax.Array) -> jax.Array:
    """logits [B,V]; counts [B,V] of generated tokens; seen [B,V] prompt ∪ generated (repetition penalty).

    Presence/frequency follow OpenAI (generated tokens only); repetition follows the CTRL rule used by
    SGLang and vLLM (divide positive logits, multiply negative ones)."""
    logits = logits - rows.frequency[:, None] * counts - rows.presence[:, None] * (counts > 0)
    penalty = rows.repetition[:, None]
    repeated = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, repeated, logits)


def filtered_logits(logits: jax.Array, rows: SamplingRows) -> jax.Array:
    """Temperature, then top-k, top-p and min-p as a mask: −inf outside the kept set. logits [B,V] fp32.

    The returned logits define the sampling distribution softmax(·); greedy rows are left unscaled (their
    argmax is the answer)."""
    greedy = rows.temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, rows.temperature)[:, None]
    ranked = -jnp.sort(-scaled, axis=-1)  # descending
    vocab = logits.shape[-1]
    top_k = jnp.where((rows.top_k <= 0) | (rows.top_k > vocab), vocab, rows.top_k)
    kth = jnp.take_along_axis(ranked, (top_k - 1)[:, None], axis=-1)
    # top-p on the distribution renormalised after top-k: the smallest prefix of the ranking whose mass
    # reaches p (the top token always stays).
    probs = jax.nn.softmax(jnp.where(jnp.arange(vocab) < top_k[:, None], ranked, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    in_nucleus = mass_before < rows.top_p[:, None]
    nucleus_floor = jnp.min(jnp.where(in_nucleus, ranked, jnp.inf), axis=-1, keepdims=True)
    # min-p keeps tokens with probability ≥ min_p · the top probability: logit ≥ top + log(min_p).
    min_p_floor = ranked[:, :1] + jnp.log(jnp.maximum(rows.min_p, 1e-30))[:, None]
    floor = jnp.maximum(jnp.maximum(kth, nucleus_floor), jnp.where(rows.min_p[:, None] > 0, min_p_floor, -jnp.inf))
    kept = jnp.where(scaled >= floor, scaled, -jnp.inf)
    return jnp.where(greedy[:, None], scaled, kept)


def position_keys(rows: SamplingRows, positions: jax.Array, purpose: int) -> jax.Array:
    """One key per row: a function of (seed, position, purpose) only. positions [B]."""
    def key(seed, position):
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), position), purpose)

    return jax.vmap(key)(rows.seed, positions)


def choose(filtered: jax.Array, rows: SamplingRows, keys: jax.Array) -> jax.Array:
    """Argmax for greedy rows, a sample of softmax(filtered) (Gumbel-max) for the others. -> [B] int32."""
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, filtered.shape[-1:], jnp.float32))(keys)
    sampled = jnp.argmax(filtered + gumbel, axis=-1)
    return jnp.where(rows.temperature <= 0, jnp.argmax(filtered, axis=-1), sampled).astype(jnp.int32)


def distribution(filtered: jax.Array, rows: SamplingRows) -> jax.Array:
    """The probabilities `choose` samples from: softmax, or one-hot at the argmax for greedy rows. [B,V] fp32."""
    greedy = jax.nn.one_hot(jnp.argmax(filtered, axis=-1), filtered.shape[-1], dtype=jnp.float32)
    return jnp.where((rows.temperature <= 0)[:, None], greedy, jax.nn.softmax(filtered, axis=-1))


def token_logprobs(logits: jax.Array, tokens: jax.Array):
    """The raw model's log-probabilities (no temperature or penalties, as OpenAI reports them).

    logits [..., V], tokens [...] -> (chosen [...], top ids [..., 20], top values [..., 20])."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    top_values, top_ids = jax.lax.top_k(logprobs, min(MAX_TOP_LOGPROBS, logits.shape[-1]))
    return chosen, top_ids.astype(jnp.int32), top_values
