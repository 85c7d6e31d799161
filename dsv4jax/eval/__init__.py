"""Jit-compiled batch evaluation: log-likelihood of (context, continuation) pairs, perplexity, and generation
tasks scored by exact match or regex. `python -m dsv4jax.eval loglik|perplexity|generate ...`."""

from dsv4jax.eval.generation import GenerationResult, evaluate_generation
from dsv4jax.eval.loglik import LoglikResult, loglikelihood
from dsv4jax.eval.perplexity import perplexity

__all__ = ["GenerationResult", "LoglikResult", "evaluate_generation", "loglikelihood", "perplexity"]
