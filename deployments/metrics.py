"""Prometheus metrics through Ray's metrics API, named after vLLM's where they overlap.

Ray exports them (with a ``ray_`` prefix) on each node's metrics port.
"""

from __future__ import annotations

from ray.serve import metrics as m

LATENCY_BUCKETS = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]
TPF_BUCKETS = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0]


class ModelMetrics:
    """Per model-server replica: latencies, engine state, and decoding efficiency per mode and tier."""

    def __init__(self, model: str) -> None:
        tags = ("model", "mode")
        self.ttft = m.Histogram(
            "triserve_time_to_first_token_seconds", "Time to first token.", LATENCY_BUCKETS, tag_keys=tags
        )
        self.itl = m.Histogram(
            "triserve_inter_token_latency_seconds", "Time per output token.", LATENCY_BUCKETS, tag_keys=tags
        )
        self.e2e = m.Histogram(
            "triserve_e2e_request_latency_seconds", "End-to-end request latency.", LATENCY_BUCKETS, tag_keys=tags
        )
        self.tpf = m.Histogram(
            "triserve_tokens_per_forward",
            "Tokens per forward pass per request.",
            TPF_BUCKETS,
            tag_keys=("model", "mode", "tier"),
        )
        self.tokens = m.Counter(
            "triserve_generation_tokens_total", "Generated tokens.", tag_keys=("model", "mode", "tier")
        )
        self.nfe = m.Counter(
            "triserve_forward_passes_total", "Forward passes (NFE).", tag_keys=("model", "mode", "tier")
        )
        self.accepted = m.Histogram(
            "triserve_spec_accepted_length",
            "Tokens emitted per speculative cycle.",
            TPF_BUCKETS + [32.0],
            tag_keys=tags,
        )
        self.running = m.Gauge("triserve_num_requests_running", "Requests in the running batch.", tag_keys=("model",))
        self.waiting = m.Gauge("triserve_num_requests_waiting", "Requests waiting for admission.", tag_keys=("model",))
        self.kv_usage = m.Gauge("triserve_kv_cache_usage_perc", "Fraction of KV pages in use.", tag_keys=("model",))
        self.prefix_queries = m.Counter(
            "triserve_prefix_cache_queries_total", "Tokens looked up in the prefix cache.", tag_keys=("model",)
        )
        self.prefix_hits = m.Counter(
            "triserve_prefix_cache_hits_total",
            "Tokens found in the prefix cache (prefill skipped).",
            tag_keys=("model",),
        )
        self.preemptions = m.Counter(
            "triserve_num_preemptions_total", "Requests preempted when the KV pool ran dry.", tag_keys=("model",)
        )
        for metric in (self.ttft, self.itl, self.e2e, self.tpf, self.tokens, self.nfe, self.accepted):
            metric.set_default_tags({"model": model})
        for metric in (self.running, self.waiting, self.kv_usage, self.prefix_queries, self.prefix_hits):
            metric.set_default_tags({"model": model})
        self.preemptions.set_default_tags({"model": model})
        self._counted = {"prefix_queries": 0, "prefix_hits": 0, "preemptions": 0}

    def finished(self, mode: str, tier: str, out, seconds: float) -> None:
        tags = {"mode": mode, "tier": tier}
        self.e2e.observe(seconds, tags={"mode": mode})
        self.tokens.inc(out.tokens, tags=tags)
        self.nfe.inc(out.nfe, tags=tags)
        if out.nfe:
            self.tpf.observe(out.tpf, tags=tags)

    def engine(self, stats) -> None:
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.kv_usage.set(stats.pool_usage)
        for name, counter in (
            ("prefix_queries", self.prefix_queries),
            ("prefix_hits", self.prefix_hits),
            ("preemptions", self.preemptions),
        ):
            total = getattr(stats, name)
            if total > self._counted[name]:
                counter.inc(total - self._counted[name])
                self._counted[name] = total


class RouterMetrics:
    def __init__(self) -> None:
        self.decisions = m.Counter(
            "triserve_router_decisions_total", "Router choices.", tag_keys=("tier", "model", "mode")
        )
