"""Every Prometheus object of the service, on an injectable registry (tests read their own)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The service's metrics, all registered on `registry`.

    Args:
        registry: Where to register; a fresh one per app keeps apps (and tests) independent.
        per_task: Label request and image counters by task. Off by default: every label value is a
            series the scraper keeps, and a server may hold 10,000 tasks (ModelMesh keeps these off too).
    """

    def __init__(self, registry: CollectorRegistry | None = None, per_task: bool = False) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.per_task = per_task
        r = self.registry
        task = ["task"] if per_task else []
        self.requests = Counter(
            "rlrr_requests_total", "HTTP requests by route, status (and task with RLRR_TASK_METRICS).",
            ["route", *task, "status"], registry=r
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
        self.images = Counter("rlrr_images_total", "Images classified (by task with RLRR_TASK_METRICS).", task,
                              registry=r)
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
        self.adapters_loaded = Gauge("rlrr_adapters_loaded", "Tasks that can be served (any tier).", registry=r)
        self.adapters_skipped = Gauge("rlrr_adapters_skipped", "Adapters in the store that were refused.", registry=r)
        # The tiers of docs/architecture.md: stored ⊇ resident ⊇ folded, hence one gauge each (a sum
        # over a `tier` label would count a task several times).
        self.tasks_stored = Gauge("rlrr_tasks_stored", "Servable tasks in the store (every tier).", registry=r)
        self.tasks_resident = Gauge("rlrr_tasks_resident", "Tasks whose tensors are in memory.", registry=r)
        self.tasks_folded = Gauge("rlrr_tasks_folded", "Tasks in the merged-weights cache.", registry=r)
        self.tasks_pinned = Gauge("rlrr_tasks_pinned", "Tasks never evicted.", registry=r)
        self.tasks_unread = Gauge("rlrr_tasks_unread", "Tasks listed in the store whose configs the background "
                                  "scan after start-up has not read yet (RLRR_STARTUP_CONFIGS).", registry=r)
        self.resident_bytes = Gauge("rlrr_resident_bytes", "Bytes of resident adapter tensors.", registry=r)
        self.resident_budget = Gauge("rlrr_resident_budget_bytes", "RLRR_RESIDENT_BYTES.", registry=r)
        self.load_seconds = Histogram("rlrr_adapter_load_seconds", "Time to make a stored task resident.",
                                      buckets=LOAD_BUCKETS, registry=r)
        self.load_failures = Counter("rlrr_adapter_load_failures_total", "Loads that refused a stored adapter.",
                                     registry=r)
        self.evictions = Counter("rlrr_adapter_evictions_total", "Resident tasks evicted (back to stored).",
                                 registry=r)
        self.queue_depth = Gauge("rlrr_queue_depth", "Images waiting for a batch.", registry=r)
        self.backbone = Info("rlrr_backbone", "The frozen backbone being served.", registry=r)

    def count_request(self, route: str, task: str, status: str) -> None:
        """One HTTP request (its task dropped unless per-task labels are on).

        Args:
            route: The route template.
            task: Task name, or "".
            status: HTTP status code.
        """
        labels = (route, task, status) if self.per_task else (route, status)
        self.requests.labels(*labels).inc()

    def count_images(self, task: str, n: int = 1) -> None:
        """Images classified under a task.

        Args:
            task: Task name.
            n: How many.
        """
        (self.images.labels(task) if self.per_task else self.images).inc(n)

    def render(self) -> bytes:
        """The text exposition format of every metric."""
        return generate_latest(self.registry)
