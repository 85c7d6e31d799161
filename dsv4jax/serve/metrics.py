"""Prometheus metrics of the server (SERVING §D.1: vLLM/SGLang-style running/waiting requests, cache use, TTFT
and inter-token histograms, speculative acceptance). One registry per server, so tests can run several."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "dsv4jax:"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)


class ServerMetrics:
    def __init__(self):
        self.registry = registry = CollectorRegistry()

        def gauge(name, doc):
            return Gauge(PREFIX + name, doc, registry=registry)

        def counter(name, doc):
            return Counter(PREFIX + name, doc, registry=registry)

        self.running = gauge("num_requests_running", "Requests in the engine's running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests queued in the engine, not yet running.")
        self.pages_used = gauge("cache_pages_used", "Cache pages held by requests.")
        self.pages_total = gauge("cache_pages_total", "Cache pages in the pool.")
        self.cache_usage = gauge("kv_cache_usage_perc", "Fraction of cache pages in use (0..1).")
        self.draft_tokens = gauge("spec_decode_num_draft_tokens", "MTP draft tokens proposed so far.")
        self.accepted_tokens = gauge("spec_decode_num_accepted_tokens", "MTP draft tokens accepted so far.")
        self.acceptance = gauge("spec_decode_acceptance_rate", "Accepted / drafted MTP tokens (0 before any draft).")
        self.finished = gauge("num_requests_finished", "Requests the engine has finished (any reason).")
        self.aborted = gauge("num_requests_aborted", "Requests the engine has aborted.")
        self.failed = gauge("num_requests_failed", "Requests that failed with an error while running (the others "
                            "went on).")
        self.preempted = gauge("num_preemptions", "Requests preempted for cache pages so far (each recomputed when "
                               "readmitted).")
        self.prefix_queries = gauge("prefix_cache_queries", "Prompt tokens of admitted requests looked up in the prefix "
                                    "cache.")
        self.prefix_hits = gauge("prefix_cache_hits", "Prompt tokens the prefix cache served (not prefilled).")
        self.pages_cached = gauge("cache_pages_cached", "Cache pages held by the prefix cache (used or evictable).")
        self.buckets_compiled = gauge("shape_buckets_compiled", "Shape buckets compiled so far (a request whose "
                                      "bucket is not among them waits for its compile).")
        self.buckets_total = gauge("shape_buckets_total", "Shape buckets this engine can use.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of requests that produced output.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.rejected = counter("num_requests_rejected", "HTTP requests refused with 503 because the queue was full "
                                "(a batch counts once).")
        self.client_aborts = counter("num_requests_abandoned", "Requests aborted because the client went away "
                                     "(each once).")
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Submit to first generated token.",
                              buckets=_LATENCY_BUCKETS, registry=registry)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between generated tokens.",
                             buckets=_LATENCY_BUCKETS, registry=registry)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Submit to finish.",
                             buckets=_LATENCY_BUCKETS, registry=registry)

    def set_stats(self, stats: dict) -> None:
        """Mirror `Engine.stats()` into the gauges."""
        self.running.set(stats.get("running", 0))
        self.waiting.set(stats.get("waiting", 0))
        used, total = stats.get("pages_used", 0), stats.get("pages_total", 0)
        self.pages_used.set(used)
        self.pages_total.set(total)
        self.cache_usage.set(used / total if total else 0.0)
        drafted, accepted = stats.get("drafted_tokens", 0), stats.get("accepted_tokens", 0)
        self.draft_tokens.set(drafted)
        self.accepted_tokens.set(accepted)
        self.acceptance.set(accepted / drafted if drafted else 0.0)
        self.finished.set(stats.get("finished", 0))
        self.aborted.set(stats.get("aborted", 0))
        self.failed.set(stats.get("failed", 0))
        self.preempted.set(stats.get("preempted", 0))
        self.prefix_queries.set(stats.get("prefix_cache_queries", 0))
        self.prefix_hits.set(stats.get("prefix_cache_hits", 0))
        self.pages_cached.set(stats.get("pages_cached", 0))
        self.buckets_compiled.set(stats.get("compiles", 0))
        self.buckets_total.set(stats.get("buckets_total", 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
