"""Serving: the inference engine (continuous batching, paged V4 caches, MTP speculative decoding) and the
OpenAI-compatible server (`python -m dsv4jax.serve`).

Engine: `engine` (the step loop and its public API), `scheduler`, `cache`, `steps`, `sampling`, `speculative`.
Server: `__main__` (the command), `app` (the HTTP API of SERVING §D.1), `protocol` (request validation and
OpenAI-style errors), `chat` (the V4 chat encoding of SERVING §D.2 and the reasoning / DSML tool-call parsers),
`async_engine` (the engine's step loop in one thread behind asyncio), `metrics` (Prometheus)."""
