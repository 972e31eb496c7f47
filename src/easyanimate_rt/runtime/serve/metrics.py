"""/metrics in Prometheus' text format (prometheus_client): queue length and jobs by
status read from the store at scrape time, denoising-step times, engine load times."""

from __future__ import annotations

from .store import STATUSES, JobStore

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, store: JobStore):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from prometheus_client.core import GaugeMetricFamily

        self.registry = CollectorRegistry()
        self._step = Histogram("easyanimate_rt_step_seconds", "Denoising step time (one step of a job)",
                               buckets=STEP_BUCKETS, registry=self.registry)
        self._load = Gauge("easyanimate_rt_engine_load_seconds", "Time to load (or build) a worker's engines",
                           ["worker"], registry=self.registry)
        self._done = Counter("easyanimate_rt_jobs_finished", "Jobs finished since the server started",
                             ["status"], registry=self.registry)
        self._job = Histogram("easyanimate_rt_job_seconds", "Job time from submission to its end",
                              buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800), registry=self.registry)

        class StoreCollector:
            def collect(self):
                counts = store.counts()
                queue = GaugeMetricFamily("easyanimate_rt_queue_length", "Jobs waiting for a worker")
                queue.add_metric([], counts["queued"])
                yield queue
                jobs = GaugeMetricFamily("easyanimate_rt_jobs", "Jobs in the store by status", labels=["status"])
                for status in STATUSES:
                    jobs.add_metric([status], counts[status])
                yield jobs

        self.registry.register(StoreCollector())

    def step(self, seconds: float) -> None:
        self._step.observe(seconds)

    def loaded(self, worker: str, seconds: float) -> None:
        self._load.labels(worker=worker).set(seconds)

    def finished(self, job) -> None:
        if job is None:
            return
        self._done.labels(status=job.status).inc()
        if job.finished is not None:
            self._job.observe(job.finished - job.created)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
