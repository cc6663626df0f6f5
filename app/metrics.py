"""Every Prometheus object of the service, on an injectable registry (tests read their own)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The service's metrics, all registered on `registry`.

    Args:
        registry: Where to register; a fresh one per app keeps apps (and tests) independent.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "rlrr_requests_total", "HTTP requests by route, task and status.", ["route", "task", "status"], registry=r
        )
        self.latency = Histogram(
            "rlrr_request_seconds", "HTTP request latency.", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "rlrr_queue_wait_seconds", "Time an image waited for its batch.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram("rlrr_batch_size", "Images per model call.", buckets=BATCH_BUCKETS, registry=r)
        self.inference = Histogram(
            "rlrr_inference_seconds", "Model time per batch.", ["strategy"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.images = Counter("rlrr_images_total", "Images classified, by task.", ["task"], registry=r)
        self.batches = Counter(
            "rlrr_batches_total", "Batches run, by execution strategy (hybrid: both in one batch).", ["strategy"],
            registry=r,
        )
        self.cache_hits = Counter("rlrr_merged_cache_hits_total", "Merged-weights cache hits.", registry=r)
        self.cache_misses = Counter("rlrr_merged_cache_misses_total", "Merged-weights cache misses.", registry=r)
        self.cache_evictions = Counter("rlrr_merged_cache_evictions_total", "Merged-weights evictions.", registry=r)
        self.auto_cost = Gauge(
            "rlrr_auto_cost_seconds", "Costs the auto strategy plans with (measured at warm-up).", ["kind"], registry=r
        )
        self.cache_bytes = Gauge("rlrr_merged_cache_bytes", "Bytes held by the merged-weights cache.", registry=r)
        self.adapters_loaded = Gauge("rlrr_adapters_loaded", "Adapters being served.", registry=r)
        self.adapters_skipped = Gauge("rlrr_adapters_skipped", "Adapters in the store that were refused.", registry=r)
        self.queue_depth = Gauge("rlrr_queue_depth", "Images waiting for a batch.", registry=r)
        self.backbone = Info("rlrr_backbone", "The frozen backbone being served.", registry=r)

    def render(self) -> bytes:
        """The text exposition format of every metric."""
        return generate_latest(self.registry)
