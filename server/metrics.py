"""Prometheus metrics of one app (its own registry, so several apps can live in one process).

Memory: prometheus-client's ``ProcessCollector`` (``process_resident_memory_bytes`` and friends,
from /proc) is registered on the app's registry, since a custom registry does not get the
default one's; the engines' KV bytes by part sit beside it, so a dashboard can tell the KV
cache's share of the resident set from the rest (weights, onnxruntime, Python).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from toolkit.server.registry import ModelRegistry

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


KV_PARTS = ("kv_decode", "kv_prefill", "prefix_cache")  # EngineStats.memory keys summed by the allocated gauge


class EngineStatsCollector(Collector):
    """Reads ``engine.stats()`` of every served model at scrape time."""

    def __init__(self, models: ModelRegistry) -> None:
        self._models = models

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield queue depth, running batch size and KV cache gauges per model."""
        gauges = {
            "waiting": GaugeMetricFamily("toolkit_queue_depth", "Requests waiting for a batch slot", labels=["model"]),
            "running": GaugeMetricFamily("toolkit_running_requests", "Requests in the running batch", labels=["model"]),
            "kv_used": GaugeMetricFamily("toolkit_kv_cache_used_tokens", "KV cache tokens in use", labels=["model"]),
            "kv_usage": GaugeMetricFamily("toolkit_kv_cache_usage_ratio", "KV cache use, 0..1", labels=["model"]),
            "kv_budget": GaugeMetricFamily("toolkit_kv_cache_budget_bytes", "KV cache budget (toolkit serve --kv-cache-gib)",
                                           labels=["model"]),
            "kv_bytes": GaugeMetricFamily("toolkit_kv_cache_allocated_bytes",
                                          "KV bytes allocated: decode batch buffers, prompts in prefill, prefix cache blocks",
                                          labels=["model", "part"]),
            "weights": GaugeMetricFamily("toolkit_model_weights_bytes", "Bytes of the model files loaded", labels=["model"]),
        }
        for entry in self._models.entries:
            try:
                stats = entry.engine.stats()
            except Exception:  # noqa: BLE001 - a scrape must not fail because one engine does
                log.warning("engine %s: stats() failed", entry.key, exc_info=True)
                continue
            label = [entry.names[0]]
            gauges["waiting"].add_metric(label, stats.waiting)
            gauges["running"].add_metric(label, stats.running)
            gauges["kv_used"].add_metric(label, stats.kv_cache_used_tokens)
            gauges["kv_usage"].add_metric(label, stats.kv_cache_usage)
            memory = stats.memory
            if "kv_budget" in memory:
                gauges["kv_budget"].add_metric(label, memory["kv_budget"])
            for part in KV_PARTS:
                if part in memory:
                    gauges["kv_bytes"].add_metric([*label, part], memory[part])
            if "weights" in memory:
                gauges["weights"].add_metric(label, memory["weights"])
        yield from gauges.values()


class NativeMemoryCollector(Collector):
    """glibc's free heap bytes (``runtime/native_memory.py``): fragmentation, resident until ``malloc_trim``."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield ``toolkit_malloc_free_bytes`` (nothing without glibc)."""
        from toolkit.runtime.native_memory import malloc_free_bytes

        free = malloc_free_bytes()
        if free is not None:
            yield GaugeMetricFamily("toolkit_malloc_free_bytes", "Free bytes in glibc's heaps (pages malloc_trim gave back included)",
                                     value=free)


class Metrics:
    """The app's counters and histograms; handlers and middleware record into it."""

    def __init__(self, models: ModelRegistry) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter("toolkit_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=reg)
        self.ttft = Histogram("toolkit_time_to_first_token_seconds", "Time from arrival to the first token",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=reg)
        self.itl = Histogram("toolkit_inter_token_latency_seconds", "Time between generated tokens",
                             ["model"], buckets=_ITL_BUCKETS, registry=reg)
        self.prompt_tokens = Counter("toolkit_prompt_tokens", "Prompt tokens processed", ["model"], registry=reg)
        self.completion_tokens = Counter("toolkit_completion_tokens", "Tokens generated", ["model"], registry=reg)
        self.request_latency = Histogram("toolkit_request_duration_seconds", "Whole request duration",
                                         ["route"], buckets=_LATENCY_BUCKETS, registry=reg)
        reg.register(EngineStatsCollector(models))
        ProcessCollector(registry=reg)  # process_resident_memory_bytes etc. (Linux /proc)
        reg.register(NativeMemoryCollector())

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
