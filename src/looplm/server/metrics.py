"""Prometheus metrics in the `looplm:` namespace, named after vLLM's `vllm:` ones (issue 14).

Every metric carries `model_name`; the per-pool ones carry `kv` (one engine per strategy in --kv). Each app
has its own registry, so two apps in one process (tests) never share counts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0)


class Metrics:
    def __init__(self, model_name: str, kvs: list[str], max_loops: int, tiers: list[str] = ()):
        self.registry = r = CollectorRegistry()
        self.model_name = model_name
        by_pool = ["model_name", "kv"]
        self.running = Gauge("looplm:num_requests_running", "Requests in the engine's batch.", by_pool, registry=r)
        self.waiting = Gauge("looplm:num_requests_waiting", "Requests queued for a row of the KV pool.", by_pool,
                             registry=r)
        self.kv_bytes = Gauge("looplm:kv_cache_bytes", "Bytes of KV held for running requests.", by_pool, registry=r)
        self.kv_allocated = Gauge("looplm:kv_cache_allocated_bytes", "Bytes of KV pool allocated.", by_pool,
                                  registry=r)
        self.ttft = Histogram("looplm:time_to_first_token_seconds", "Time from arrival to the first token.",
                              ["model_name"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("looplm:inter_token_latency_seconds", "Time between two tokens of a request.",
                             ["model_name"], buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("looplm:e2e_request_latency_seconds", "Time from arrival to the last token.",
                             ["model_name"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("looplm:prompt_tokens", "Prompt tokens processed.", ["model_name"], registry=r)
        self.generation_tokens = Counter("looplm:generation_tokens", "Tokens generated.", ["model_name"], registry=r)
        self.loops = Histogram("looplm:loops_per_token", "Loops of the core each generated token ran.", by_pool,
                               buckets=tuple(float(b) for b in range(1, max_loops + 1)), registry=r)
        self.requests = Counter("looplm:request_success", "Requests finished, by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self.rejected = Counter("looplm:request_rejected", "Requests refused: a full queue (503).", ["model_name"],
                                registry=r)
        self.prefix_queries = Counter("looplm:prefix_cache_queries", "Prompt chunks looked up in the KV prefix store.",
                                      ["model_name"], registry=r)
        self.prefix_hits = Counter("looplm:prefix_cache_hits", "Prompt chunks found in the KV prefix store, by tier.",
                                   ["model_name", "tier"], registry=r)
        self.prefix_queries.labels(model_name)
        for tier in tiers:
            self.prefix_hits.labels(model_name, tier)
        self._seen: dict[str, tuple[int, dict]] = {}  # kv → the engine's prefix counts at the last update
        for kv in kvs:  # every pool's series exists from the start, at 0
            for g in (self.running, self.waiting, self.kv_bytes, self.kv_allocated):
                g.labels(model_name, kv).set(0)
            self.loops.labels(model_name, kv)

    def pool_stats(self, kv: str, stats: dict) -> None:
        """The engine's `stats()` after a step."""
        m = self.model_name
        self.running.labels(m, kv).set(stats["running"])
        self.waiting.labels(m, kv).set(stats["waiting"])
        self.kv_bytes.labels(m, kv).set(stats["kv_bytes"])
        self.kv_allocated.labels(m, kv).set(stats["kv_allocated_bytes"])
        queries, hits = stats.get("prefix_cache_queries", 0), stats.get("prefix_cache_hits", {})
        q0, h0 = self._seen.get(kv, (0, {}))
        if queries > q0:
            self.prefix_queries.labels(m).inc(queries - q0)
        for tier in sorted(hits):
            if hits[tier] > h0.get(tier, 0):
                self.prefix_hits.labels(m, tier).inc(hits[tier] - h0.get(tier, 0))
        self._seen[kv] = (queries, dict(hits))

    def tokens(self, kv: str, loops: list[int]) -> None:
        self.generation_tokens.labels(self.model_name).inc(len(loops))
        hist = self.loops.labels(self.model_name, kv)
        for n in loops:
            hist.observe(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
