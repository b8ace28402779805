"""Prometheus metrics of one server, in a registry of its own (several apps can live in one process).

Names follow vLLM's (`vllm:` -> `ridgeline:`) so existing dashboards need only a prefix change.
Gauges and counters are refreshed by the engine thread after every step; the latency
histograms are observed once per finished request from the engine's own timestamps.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from ..engine import LLMEngine
from ..outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
disable_created_metrics()  # the *_created series only add noise to a scrape

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                240.0, 480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.running = Gauge("ridgeline:num_requests_running", "Requests with a sequence in the running batch.",
                             labels, registry=r).labels(model_name)
        self.waiting = Gauge("ridgeline:num_requests_waiting", "Requests queued, not yet running.",
                             labels, registry=r).labels(model_name)
        self.kv_usage = Gauge("ridgeline:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).",
                              labels, registry=r).labels(model_name)
        self.kv_blocks_used = Gauge("ridgeline:kv_cache_blocks_used", "KV-cache blocks in use.",
                                    labels, registry=r).labels(model_name)
        self.kv_blocks_total = Gauge("ridgeline:kv_cache_blocks_total", "KV-cache blocks in the pool.",
                                     labels, registry=r).labels(model_name)
        self.kv_blocks_shared = Gauge("ridgeline:kv_cache_blocks_shared",
                                      "KV-cache blocks referenced by more than one sequence (prefix hits, forks).",
                                      labels, registry=r).labels(model_name)
        self.prefix_hit_rate = Gauge("ridgeline:prefix_cache_hit_rate",
                                     "Prompt tokens found in the prefix cache / looked up, since start.",
                                     labels, registry=r).labels(model_name)
        self.prompt_tokens = Counter("ridgeline:prompt_tokens", "Prompt tokens prefilled (recomputation included).",
                                     labels, registry=r).labels(model_name)
        self.generation_tokens = Counter("ridgeline:generation_tokens", "Tokens generated.",
                                         labels, registry=r).labels(model_name)
        self.preemptions = Counter("ridgeline:num_preemptions", "Sequences preempted for lack of KV blocks.",
                                   labels, registry=r).labels(model_name)
        self.prefix_queries = Counter("ridgeline:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                      labels, registry=r).labels(model_name)
        self.prefix_hits = Counter("ridgeline:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                   labels, registry=r).labels(model_name)
        # speculative decoding (zero while it is off); vLLM's spec_decode_* names
        self.spec_drafts = Counter("ridgeline:spec_decode_num_drafts",
                                   "Speculative rows verified: a sequence with proposed tokens, in one step.",
                                   labels, registry=r).labels(model_name)
        self.spec_draft_tokens = Counter("ridgeline:spec_decode_num_draft_tokens", "Proposed tokens verified.",
                                         labels, registry=r).labels(model_name)
        self.spec_accepted_tokens = Counter("ridgeline:spec_decode_num_accepted_tokens",
                                            "Proposed tokens accepted by the target.",
                                            labels, registry=r).labels(model_name)
        self.spec_acceptance_rate = Gauge("ridgeline:spec_decode_acceptance_rate",
                                          "Accepted / proposed tokens, since start (0 to 1).",
                                          labels, registry=r).labels(model_name)
        self.spec_mean_accepted_length = Gauge(
            "ridgeline:spec_decode_mean_accepted_length",
            "Tokens a speculative row yields on average (its accepted proposals and the token after), since start.",
            labels, registry=r).labels(model_name)
        self._success = Counter("ridgeline:request_success", "Finished requests by finish reason.",
                                labels + ["finished_reason"], registry=r)
        self._model = model_name
        self.aborted = Counter("ridgeline:request_aborted", "Requests aborted (client gone or shutdown).",
                               labels, registry=r).labels(model_name)
        self.ttft = Histogram("ridgeline:time_to_first_token_seconds", "Time to first token.",
                              labels, buckets=_TTFT_BUCKETS, registry=r).labels(model_name)
        self.tpot = Histogram("ridgeline:time_per_output_token_seconds", "Mean time per output token after the first.",
                              labels, buckets=_TPOT_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("ridgeline:e2e_request_latency_seconds", "Arrival to last token.",
                             labels, buckets=_E2E_BUCKETS, registry=r).labels(model_name)
        self._seen = {"prompt_tokens": 0, "generation_tokens": 0, "num_preemptions": 0,
                      "prefix_cache_queries": 0, "prefix_cache_hits": 0, "spec_decode_num_drafts": 0,
                      "spec_decode_num_draft_tokens": 0, "spec_decode_num_accepted_tokens": 0}

    def update(self, engine: LLMEngine, outputs: list[RequestOutput], running: int, waiting: int) -> None:
        """Refresh from the engine (engine thread only)."""
        self.running.set(running)
        self.waiting.set(waiting)
        stats = engine.get_stats()
        self.kv_blocks_used.set(stats.kv_blocks_used)
        self.kv_blocks_total.set(stats.kv_blocks_total)
        self.kv_usage.set(stats.kv_cache_usage)
        self.kv_blocks_shared.set(stats.kv_blocks_shared)
        self.prefix_hit_rate.set(stats.prefix_cache_hit_rate)
        self.spec_acceptance_rate.set(stats.spec_decode_acceptance_rate)
        self.spec_mean_accepted_length.set(stats.spec_decode_mean_accepted_length)
        for key, counter in (("prompt_tokens", self.prompt_tokens), ("generation_tokens", self.generation_tokens),
                             ("num_preemptions", self.preemptions), ("prefix_cache_queries", self.prefix_queries),
                             ("prefix_cache_hits", self.prefix_hits), ("spec_decode_num_drafts", self.spec_drafts),
                             ("spec_decode_num_draft_tokens", self.spec_draft_tokens),
                             ("spec_decode_num_accepted_tokens", self.spec_accepted_tokens)):
            now = getattr(stats, key)
            if now > self._seen[key]:
                counter.inc(now - self._seen[key])
            self._seen[key] = now
        for out in outputs:
            if out.finished:
                self._observe_finished(out)

    def _observe_finished(self, out: RequestOutput) -> None:
        m = out.metrics
        arrival, first, finish = m.get("arrival_time"), m.get("first_token_time"), m.get("finish_time")
        for comp in out.outputs:
            self._success.labels(self._model, comp.finish_reason or "unknown").inc()
        if arrival is None or first is None or finish is None:
            return
        self.ttft.observe(max(0.0, first - arrival))
        self.e2e.observe(max(0.0, finish - arrival))
        n_out = max((len(c.token_ids) for c in out.outputs), default=0)
        if n_out > 1:
            self.tpot.observe(max(0.0, finish - first) / (n_out - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
