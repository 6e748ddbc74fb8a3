"""The server's Prometheus metrics, in a registry of its own (one per app, so tests can run several).

Request counts and time to first token are recorded as they happen; the scheduler's state (queue
depth, batch size, cache use, token counts and the recent rate) is read when scraped.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _SchedulerCollector:
    def __init__(self, scheduler):
        self.s = scheduler

    def collect(self):
        s = self.s
        gauges = [("zquant_queue_depth", "requests waiting for a cache slot", s.queue_depth),
                  ("zquant_batch_size", "sequences in the running batch", s.batch_size),
                  ("zquant_kv_cache_tokens", "tokens held in the KV cache", s.tokens_in_cache),
                  ("zquant_tokens_per_second", "tokens generated per second over the last 10 s", s.tokens_per_second()),
                  ("zquant_max_batch", "cache slots", s.max_batch),
                  ("zquant_slot_tokens", "tokens per cache slot (one request's context)", s.slot_len)]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily("zquant_generated_tokens", "tokens generated", value=s.generated_tokens)
        yield CounterMetricFamily("zquant_prompt_tokens", "prompt tokens prefilled", value=s.prompt_tokens)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, scheduler):
        self.registry = CollectorRegistry()
        self.requests = Counter("zquant_requests", "HTTP requests answered, by path and status", ["path", "status"],
                                registry=self.registry)
        self.ttft = Histogram("zquant_time_to_first_token_seconds", "from a request's arrival to its first token",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.registry.register(_SchedulerCollector(scheduler))

    def render(self) -> bytes:
        return generate_latest(self.registry)
