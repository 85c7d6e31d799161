"""Serving: the inference engine (continuous batching, paged V4 caches, MTP speculative decoding; issue #4) and the
OpenAI-compatible server (`python -m dsv4jax.serve`; issue #5). Not built yet — `dsv4jax.api.Model.generate` is
the way to generate today."""
