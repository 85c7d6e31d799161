"""Serving: the inference engine (continuous batching, paged V4 caches, MTP speculative decoding; issue #4) and the
OpenAI-compatible server (`python -m dsv4jax.serve`; issue #5).

Engine: `engine` (the step loop and its public API), `scheduler`, `cache`, `steps`, `sampling`, `speculative`.
Server: `__main__` (the command), `app` (the HTTP API of SERVING.md §D.1), `protocol` (request validation and
OpenAI-style errors), `chat` (the V4 chat encoding of §D.2 and the reasoning / DSML tool-call parsers),
`async_engine` (the engine's step loop in one thread behind asyncio), `metrics` (Prometheus)."""
