"""Prometheus metrics of one served engine, in a registry of their own (one per app/router).

Observed per HTTP request (histograms, seconds):
    kvfuse_ttft_seconds               submit -> first token (queueing included)
    kvfuse_request_duration_seconds   submit -> last token
    kvfuse_http_requests_total{endpoint, status}
Read from `engine.stats()` at scrape time:
    kvfuse_tokens_reused_total, kvfuse_tokens_recomputed_total, kvfuse_tokens_generated_total
    kvfuse_requests_total{state}      completed / failed / cancelled / prefilled
    kvfuse_queue_depth, kvfuse_running_requests
    kvfuse_pool_hits_total{tier}, kvfuse_pool_hit_rate{tier}   tiers hot (GPU pool) / warm (pinned) / cold (store)
    kvfuse_bytes_loaded_total{tier}   disk / pinned / gpu
    kvfuse_release_reloads_total
    kvfuse_release_info{release, model}   1 for the release new requests read
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from kvfuse.runtime import Answer

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class EngineCollector:
    """Turns `engine.stats()` into metric families at each scrape."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        helps = {"reused": "Prompt tokens whose stored KV was kept (prefix + context).",
                 "recomputed": "Prompt tokens computed at serve time (recomputed context + question).",
                 "generated": "Answer tokens generated."}
        for name, help_text in helps.items():
            c = CounterMetricFamily(f"kvfuse_tokens_{name}", help_text)
            c.add_metric([], s.get(f"tokens_{name}", 0))
            yield c
        req = CounterMetricFamily("kvfuse_requests", "Engine requests by how they ended.", labels=["state"])
        for state in ("completed", "failed", "cancelled", "prefilled"):
            req.add_metric([state], s.get(f"requests_{state}", 0))
        yield req
        reloads = CounterMetricFamily("kvfuse_release_reloads", "Hot release reloads.")
        reloads.add_metric([], s.get("reloads", 0))
        yield reloads
        for name, key, doc in (("kvfuse_queue_depth", "queue_depth", "Requests waiting for their prefill."),
                               ("kvfuse_running_requests", "running", "Requests being decoded.")):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], s.get(key, 0))
            yield g
        source = s.get("source", {})
        hits = source.get("hits", {})
        total = sum(hits.values())
        hc = CounterMetricFamily("kvfuse_pool_hits", "Chunk reads by the tier that served them.", labels=["tier"])
        hr = GaugeMetricFamily("kvfuse_pool_hit_rate", "Fraction of chunk reads served by each tier.", labels=["tier"])
        for tier, n in hits.items():
            hc.add_metric([tier], n)
            hr.add_metric([tier], n / total if total else 0.0)
        yield hc
        yield hr
        bl = CounterMetricFamily("kvfuse_bytes_loaded", "KV bytes loaded, by the tier read from.", labels=["tier"])
        for tier, n in source.get("bytes_loaded", {}).items():
            bl.add_metric([tier], n)
        yield bl
        info = InfoMetricFamily("kvfuse_release", "The release new requests read.")
        info.add_metric([], {"release": str(s.get("release")), "model": str(self.engine.model_name)})
        yield info


class ServerMetrics:
    """The registry /metrics exposes: request histograms plus the engine's counters."""

    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.ttft = Histogram("kvfuse_ttft_seconds", "Time to first token (submit -> first token), seconds.",
                              buckets=_BUCKETS, registry=self.registry)
        self.latency = Histogram("kvfuse_request_duration_seconds", "End-to-end latency (submit -> last "
                                 "token), seconds.", buckets=_BUCKETS, registry=self.registry)
        self.http = Counter("kvfuse_http_requests", "HTTP requests by endpoint and status.",
                            ["endpoint", "status"], registry=self.registry)
        self.registry.register(EngineCollector(engine))

    def observe(self, answer: Answer) -> None:
        self.ttft.observe(answer.ttft_s)
        if answer.total_s is not None:
            self.latency.observe(answer.total_s)

    def count(self, endpoint: str, status: int) -> None:
        self.http.labels(endpoint, str(status)).inc()

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
