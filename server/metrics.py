"""Prometheus metrics, exactly the names, labels and buckets of docs/INTERNALS.md.

Each app owns its ``CollectorRegistry`` (never the process-global default), so two apps in one process —
tests — do not share counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
GAP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
OUTCOMES = ("ok", "rejected", "timeout", "invalid", "error")
REJECTION_REASONS = ("queue_full", "deadline", "strict_unservable", "shutdown")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def bits_label(bits: int | None) -> str:
    return "none" if bits is None else str(bits)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)  # the standard process_* metrics: CPU seconds, resident memory, fds
        self.requests = Counter(
            "apserve_requests_total", "Inference requests by outcome and bits", ["outcome", "bits"], registry=r
        )
        self.images = Counter("apserve_images_total", "Images computed, by bits", ["bits"], registry=r)
        self.request_duration = Histogram(
            "apserve_request_duration_seconds",
            "Time from admission to answer of requests served",
            ["bits"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "apserve_queue_duration_seconds", "Time requests waited in the queue", buckets=LATENCY_BUCKETS, registry=r
        )
        self.compute_duration = Histogram(
            "apserve_compute_duration_seconds",
            "Engine time per batch",
            ["bits"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # their ratio of rates is how much slower the engine runs than when it was profiled: CPU time of
        # the thread that called the engine, so time the event loop took from it does not count
        self.engine_cpu = Counter(
            "apserve_engine_cpu_seconds_total", "Engine CPU time of the calling thread", ["bits"], registry=r
        )
        # the worker's own work per batch (joining it, accounting, the next decision): a cost per batch,
        # not per request, that the simulator charges per batch (apserve simulate --batch-cost-us)
        self.worker_cpu = Counter(
            "apserve_worker_cpu_seconds_total",
            "CPU time of the worker threads outside Engine.run: joining a batch, accounting, deciding the next",
            registry=r,
        )
        self.engine_profiled = Counter(
            "apserve_engine_profiled_seconds_total",
            "What the profile predicted for the same batches",
            ["bits"],
            registry=r,
        )
        self.batch_gap = Histogram(
            "apserve_batch_gap_seconds",
            "Engine idle between a batch's end and the next batch's start while requests waited",
            buckets=GAP_BUCKETS,
            registry=r,
        )
        self.answer_delay = Histogram(
            "apserve_answer_delay_seconds",
            "From a batch's end until a request's answer was sent",
            buckets=GAP_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "apserve_batch_size", "Images per batch", ["bits"], buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("apserve_queue_depth", "Requests waiting in the queue", registry=r)
        self.batches = Counter(
            "apserve_batches_total", "Batches run, by bits, policy and reason", ["bits", "policy", "reason"], registry=r
        )
        self.slo_violations = Counter(
            "apserve_slo_violations_total", "Requests answered after their deadline or timed out", registry=r
        )
        self.rejections = Counter("apserve_rejections_total", "Requests refused, by reason", ["reason"], registry=r)
        self.power = Gauge("apserve_power_watts", "Rolling average power", ["source"], registry=r)
        self.power_budget = Gauge("apserve_power_budget_watts", "Configured power budget", registry=r)
        self.energy = Counter("apserve_energy_joules_total", "Energy spent computing", registry=r)
        self.served_accuracy = Gauge(
            "apserve_served_accuracy", "Expected accuracy of what was served (rolling)", registry=r
        )
        self.slo = Gauge("apserve_slo_seconds", "Configured default SLO", registry=r)
        self.latency_scale = Gauge(
            "apserve_latency_scale_ratio",
            "Recent batch latency over the profiled latency (what policies plan with)",
            registry=r,
        )
        self.backend_info = Gauge("apserve_backend_info", "Backend serving each bits", ["bits", "backend"], registry=r)
        self.build_info = Gauge("apserve_build_info", "Build", ["version", "model", "policy"], registry=r)
        for outcome in OUTCOMES:  # so rate() over them exists from the first scrape
            self.requests.labels(outcome=outcome, bits="none")
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason=reason)

    def set_build(self, version: str, model: str, policy: str) -> None:
        self.build_info.clear()
        self.build_info.labels(version=version, model=model, policy=policy).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
