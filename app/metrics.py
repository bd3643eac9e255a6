"""Prometheus metrics (prometheus-client); exposed at /metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

REQUEST_LATENCY = Histogram(
    "xmodal_request_seconds",
    "HTTP request latency by route and status.",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BATCH_SIZE = Histogram(
    "xmodal_batch_size",
    "Items per forward pass, by batcher.",
    ["batcher"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
SHED = Counter(
    "xmodal_batch_shed_total",
    "Requests refused with 503 because the queue ahead held more than the allowed delay.",
    ["batcher"],
)
QUEUE_DEPTH = Gauge("xmodal_queue_depth", "Requests waiting in a batcher queue.", ["batcher"])
INDEX_SIZE = Gauge("xmodal_index_vectors", "Vectors searchable in each index.", ["index"])
ITEMS_ADDED = Counter("xmodal_items_added_total", "Items stored, by kind.", ["kind"])
QUERY_CACHE_SIZE = Gauge("xmodal_query_cache_entries", "Query-text vectors held in the cache.")
QUERY_CACHE_HITS = Counter(
    "xmodal_query_cache_hits_total", "Query texts answered from the vector cache."
)
QUERY_CACHE_MISSES = Counter(
    "xmodal_query_cache_misses_total", "Query texts the cache did not hold (encoded)."
)


class StoreCacheMetrics:
    """One of the store's caches, read when /metrics is scraped (the store, in index/, keeps
    plain counters and knows nothing of Prometheus). `source` returns (entries, hits,
    misses); None until a data dir is open."""

    def __init__(self, name: str, entries: str, hits: str, misses: str) -> None:
        self.name = name
        self.help = (entries, hits, misses)
        self.source: Callable[[], tuple[int, int, int]] | None = None

    def collect(self) -> Iterator[Metric]:
        if self.source is None:
            return
        entries, hits, misses = self.source()
        yield GaugeMetricFamily(f"{self.name}_entries", self.help[0], value=entries)
        yield CounterMetricFamily(f"{self.name}_hits", self.help[1], value=hits)
        yield CounterMetricFamily(f"{self.name}_misses", self.help[2], value=misses)


ROW_CACHE = StoreCacheMetrics(
    "xmodal_row_cache",
    "Result rows held in memory.",
    "Result rows served from memory.",
    "Result rows read from SQLite.",
)
FILTER_CACHE = StoreCacheMetrics(
    "xmodal_filter_cache",
    "Metadata filters whose matching ids are held in memory.",
    "Filters answered from memory (brought up to date from the change log).",
    "Filters answered by SQLite.",
)
REGISTRY.register(ROW_CACHE)
REGISTRY.register(FILTER_CACHE)
