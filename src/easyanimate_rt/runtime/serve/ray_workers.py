"""Workers as a Ray Serve deployment, for more than one GPU or machine (``serve --ray``).

Each replica owns one Pipeline (``num_gpus=1`` on a GPU cluster, CPU replicas
otherwise) and runs one job at a time (``max_ongoing_requests=1``); Ray Serve places,
restarts and (with ``--autoscale``) scales them. The job API and the store stay in the
front process: one WorkerLoop per replica slot claims a job and calls the deployment
through a streaming handle; the replica streams back each step, each checkpoint and
finally the video's bytes, so replicas need no shared filesystem. Cancelling closes the
stream: the replica's run stops at its next step boundary. A replica that dies
mid-job raises WorkerLost and the job goes back to the queue with its checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ...errors import EasyAnimateError, EngineError, InputError, MissingDependencyError
from ...fileio import atomic_path
from .jobs import JobCancelled, WorkerLost, run_job

log = logging.getLogger(__name__)

APP_NAME = "easyanimate-rt"


def _import_ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise MissingDependencyError("ray[serve]", "serve-ray", "serve --ray") from None
    return ray, serve


class VideoReplica:
    """The deployment's class (wrapped by ``serve.deployment`` in ``start_ray_executors``)."""

    def __init__(self, model: str, kwargs: dict[str, Any]):
        from ..pipeline import Pipeline

        t = time.perf_counter()
        self.pipe = Pipeline.from_pretrained(model, seed=0, **kwargs)
        self.load = time.perf_counter() - t
        _, serve = _import_ray()
        self.replica = serve.get_replica_context().replica_id.unique_id  # reported with each job

    def load_seconds(self) -> float:
        return self.load

    async def run(self, request: dict[str, Any], every: int, resume: bytes | None):
        """Yields ("progress", done, total), ("checkpoint", step, state) ... then
        ("done", mp4 bytes, timings), ("cancelled",) or ("error", kind, message)."""
        events: queue.Queue = queue.Queue()
        stop = threading.Event()

        def work() -> None:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "video.mp4"
                try:
                    timings = run_job(self.pipe, request, out,
                                      lambda d, n: (events.put(("progress", d, n)), stop.is_set())[1],
                                      lambda s, b: events.put(("checkpoint", s, b)), every, resume, stop.is_set)
                    events.put(("done", out.read_bytes(), {**timings, "replica": self.replica}))
                except JobCancelled:
                    events.put(("cancelled",))
                except InputError as exc:
                    events.put(("error", "input", str(exc)))
                except EasyAnimateError as exc:
                    events.put(("error", "engine", str(exc)))
                except Exception as exc:  # reported to the front; the replica lives on
                    log.exception("job failed in a replica")
                    events.put(("error", "internal", f"internal error: {type(exc).__name__}: {exc}"))

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            while True:
                item = await asyncio.to_thread(events.get)
                yield item
                if item[0] in ("done", "cancelled", "error"):
                    return
        finally:  # the front closed the stream (a cancel): stop at the next step
            stop.set()


class RayExecutor:
    """One replica slot: runs a job through the deployment handle's stream."""

    def __init__(self, name: str, handle, load_seconds: float):
        self.name = name
        self.handle = handle
        self.load_seconds = load_seconds

    def run(self, request, out, on_step, save, every, resume, stopping):
        ray, _ = _import_ray()
        stream = self.handle.options(stream=True).run.remote(request, every, resume)
        try:
            for item in stream:
                kind = item[0]
                if kind == "progress":
                    if on_step(item[1], item[2]):  # closing the stream stops the replica's run
                        stream.cancel()
                        raise JobCancelled(f"cancelled after step {item[1]} of {item[2]}")
                elif kind == "checkpoint":
                    save(item[1], item[2])
                elif kind == "done":
                    with atomic_path(out) as tmp:
                        tmp.write_bytes(item[1])
                    return item[2]
                elif kind == "cancelled":
                    raise JobCancelled("cancelled in the replica")
                elif kind == "error":
                    raise (InputError if item[1] == "input" else EngineError)(item[2])
        except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError,
                ray.exceptions.ActorUnavailableError) as exc:
            raise WorkerLost(f"the Ray replica running the job died ({type(exc).__name__})") from None
        raise WorkerLost("the Ray replica's stream ended without a result")


class RayCluster:
    """Holds the Ray connection; ``close`` tears the application down."""

    def __init__(self, started_local: bool):
        self.started_local = started_local

    def close(self) -> None:
        ray, serve = _import_ray()
        try:
            serve.delete(APP_NAME)
            if self.started_local:
                serve.shutdown()
                ray.shutdown()
        except Exception as exc:  # shutting down: report, never mask the stop
            log.warning("Ray shutdown: %s", exc)


def start_ray_executors(opts, say) -> tuple[list[RayExecutor], RayCluster]:
    """Connect to (or start) Ray, deploy the replicas: one RayExecutor per replica slot,
    and the cluster to close at the end."""
    import os

    ray, serve = _import_ray()
    local = opts.ray in ("auto", "local", "")
    t = time.perf_counter()
    if not ray.is_initialized():
        if local:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=opts.ray, log_to_driver=False, configure_logging=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    device = "cuda" if gpus and opts.device in ("auto", "cuda") else "cpu"
    if opts.device not in ("auto", "cuda", "cpu"):
        raise InputError(f"--ray places replicas itself: --device must be auto, cuda or cpu, got {opts.device!r}")
    replicas = opts.replicas or (opts.autoscale[1] if opts.autoscale else (gpus if device == "cuda" else 1))
    threads = opts.threads or max(1, (os.cpu_count() or 1) // replicas)
    actor = {"num_gpus": 1} if device == "cuda" else {"num_cpus": 1}
    config: dict[str, Any] = dict(ray_actor_options=actor, max_ongoing_requests=1, max_queued_requests=-1)
    if opts.autoscale is not None:
        config["autoscaling_config"] = {"min_replicas": opts.autoscale[0], "max_replicas": opts.autoscale[1],
                                        "target_ongoing_requests": 1}
    else:
        config["num_replicas"] = replicas
    deployment = serve.deployment(name="VideoReplica", **config)(VideoReplica)
    kwargs = opts.pipeline_kwargs(threads, device)
    handle = serve.run(deployment.bind(opts.model, kwargs), name=APP_NAME, route_prefix=None)
    load = float(handle.load_seconds.remote().result())
    say(f"Ray Serve: {replicas} replica(s) on {'GPU' if device == 'cuda' else 'CPU'} "
        f"({ray.cluster_resources().get('CPU', 0):.0f} CPUs, {gpus} GPUs in the cluster), ready in "
        f"{time.perf_counter() - t:.1f}s")
    return [RayExecutor(f"ray{k}", handle, load) for k in range(replicas)], RayCluster(local)
