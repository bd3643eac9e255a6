"""Prometheus metrics (prometheus-client); exposed at /metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
