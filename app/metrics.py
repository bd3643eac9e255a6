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


class RowCacheMetrics:
    """The store's result-row cache, read when /metrics is scraped (the store, in index/,
    keeps plain counters and knows nothing of Prometheus). `source` returns (entries, hits,
    misses); None until a data dir is open."""

    def __init__(self) -> None:
        self.source: Callable[[], tuple[int, int, int]] | None = None

    def collect(self) -> Iterator[Metric]:
        if self.source is None:
            return
        entries, hits, misses = self.source()
        yield GaugeMetricFamily(
            "xmodal_row_cache_entries", "Result rows held in memory.", value=entries
        )
        yield CounterMetricFamily(
            "xmodal_row_cache_hits", "Result rows served from memory.", value=hits
        )
        yield CounterMetricFamily(
            "xmodal_row_cache_misses", "Result rows read from SQLite.", value=misses
        )


ROW_CACHE = RowCacheMetrics()
REGISTRY.register(ROW_CACHE)
