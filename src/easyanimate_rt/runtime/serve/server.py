"""``easyanimate-rt serve``: the job API, its store and its workers in one process (or
the workers as Ray Serve replicas, runtime/serve/ray_workers.py).

Start-up: check the settings (a non-loopback bind needs an API key), take the store's
lock, put jobs a dead server left running back in the queue, load one Pipeline per
worker (engines built on first use, then kept warm), bind, then serve. Stopping
(SIGINT/SIGTERM): the API stops taking requests, running jobs save their state at the
step they reached and go back to the queue; the next start resumes them.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import ConfigError, InputError, MissingDependencyError
from .jobs import MAX_ATTEMPTS, Limits, LocalExecutor, WorkerLoop
from .store import JobStore

log = logging.getLogger(__name__)

API_KEY_ENV = "EASYANIMATE_RT_API_KEY"


@dataclass
class ServeOptions:
    model: str
    store: Path
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    max_queue: int = 64
    checkpoint_every: int = 5
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    # the Pipeline's settings (as generate's)
    backend: str = "auto"
    precision: str | None = None
    device: str = "auto"
    threads: int | None = None
    cache_dir: str | None = None
    compile: bool = True
    cache: str = "none"
    cache_threshold: float | None = None
    buckets: list | None = None
    # Ray Serve: None (local worker threads), "auto"/"local" or a cluster address
    ray: str | None = None
    replicas: int | None = None
    autoscale: tuple[int, int] | None = None
    lora_dir: Path | None = None  # LoRA adapters requests may name (NAME.safetensors)

    def check(self) -> None:
        for name, low in (("workers", 1), ("max_queue", 1), ("checkpoint_every", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InputError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        if not 0 <= self.port <= 65535:
            raise InputError(f"--port must be in [0, 65535], got {self.port}")
        if not is_loopback(self.host) and not self.api_key:
            raise ConfigError(f"binding to {self.host!r} (not loopback) requires an API key: pass --api-key or set "
                              f"{API_KEY_ENV}")
        if self.replicas is not None and self.replicas < 1:
            raise InputError(f"--replicas must be >= 1, got {self.replicas}")
        if self.autoscale is not None and not 0 <= self.autoscale[0] <= self.autoscale[1] or \
                self.autoscale is not None and self.autoscale[1] < 1:
            raise InputError(f"--autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1, got {self.autoscale}")
        if self.ray is None and (self.replicas is not None or self.autoscale is not None):
            raise InputError("--replicas and --autoscale size Ray Serve deployments: add --ray")

    def pipeline_kwargs(self, threads: int | None, device: str) -> dict[str, Any]:
        return dict(backend=self.backend, precision=self.precision, device=device, threads=threads,
                    cache_dir=self.cache_dir, compile=self.compile, cache=self.cache,
                    cache_threshold=self.cache_threshold, buckets=self.buckets)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def worker_devices(device: str, n: int) -> list[str]:
    """One device per worker: cuda:0..n-1 on a GPU box (``auto`` with CUDA visible), else cpu."""
    from ..pipeline import resolve_device

    resolved = resolve_device(device)
    if resolved == "cpu" or device not in ("auto", "cuda"):
        return [resolved] * n
    import torch

    count = torch.cuda.device_count()
    if n > count:
        raise InputError(f"--workers {n}: one worker per GPU, and {count} are visible")
    return [f"cuda:{k}" for k in range(n)]


def load_local_executors(opts: ServeOptions, say) -> list[LocalExecutor]:
    from ..pipeline import Pipeline

    threads = opts.threads or max(1, (os.cpu_count() or 1) // opts.workers)
    executors = []
    for k, device in enumerate(worker_devices(opts.device, opts.workers)):
        t = time.perf_counter()
        # Worker 0 builds missing engines (first use); the others load what it built.
        pipe = Pipeline.from_pretrained(opts.model, seed=0, **opts.pipeline_kwargs(threads, device))
        executors.append(LocalExecutor(f"w{k}", pipe))
        say(f"worker w{k}: {pipe.config.name} on {pipe.describe()} ({device}, {threads} threads), "
            f"ready in {time.perf_counter() - t:.1f}s")
    return executors


def model_config(model: str):
    from ..pipeline import read_config

    config = read_config(model)
    if config is None:
        from ...reference.weights import load_model_or_preset

        config = load_model_or_preset(model).config
    return config


def serve(opts: ServeOptions, say=print) -> None:
    """Run the server until SIGINT/SIGTERM (see the module docstring)."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import sse_starlette  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise MissingDependencyError(exc.name or "fastapi", "serve", "easyanimate-rt serve") from None

    from .app import create_app
    from .metrics import Metrics

    opts.check()
    from .jobs import LoraLibrary

    loras = LoraLibrary.scan(opts.lora_dir)  # every file checked before the store opens or a worker loads
    if loras.adapters:
        say(f"LoRA adapters offered: {', '.join(sorted(loras.adapters))}")
    store = JobStore(opts.store)
    store.lock()
    recovered, failed = store.recover(MAX_ATTEMPTS)
    if recovered:
        say(f"store {opts.store}: {recovered} job(s) a stopped server left running are back in the queue")
    if failed:
        say(f"store {opts.store}: {failed} job(s) were running each time a server died ({MAX_ATTEMPTS} attempts): "
            f"marked failed")
    config = model_config(opts.model)
    if opts.ray is not None:
        from .ray_workers import start_ray_executors

        executors, cluster = start_ray_executors(opts, say)
    else:
        executors, cluster = load_local_executors(opts, say), None
    metrics = Metrics(store)
    for ex in executors:
        metrics.loaded(ex.name, ex.load_seconds)
    wake, stop = threading.Event(), threading.Event()
    loops = [WorkerLoop(store, ex, opts.checkpoint_every, wake, stop, metrics) for ex in executors]
    info = {"workers": len(loops), "ray": opts.ray is not None}
    app = create_app(store, config, opts.limits, api_key=opts.api_key, max_queue=opts.max_queue, wake=wake,
                     metrics=metrics, info=info, loras=loras)
    family = socket.AF_INET6 if ":" in opts.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((opts.host, opts.port))
    except OSError as exc:
        raise InputError(f"cannot listen on {opts.host}:{opts.port} ({exc.strerror})") from None
    port = sock.getsockname()[1]
    host = f"[{opts.host}]" if family == socket.AF_INET6 else opts.host
    url = f"http://{host}:{port}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    for loop in loops:
        loop.start()
    store.write_address(url)
    say(f"serving {config.name} on {url}: {len(loops)} worker(s){' (Ray Serve)' if opts.ray else ''}, store "
        f"{opts.store}, queue limit {opts.max_queue}, checkpoint every {opts.checkpoint_every} steps"
        + ("" if opts.api_key else ", no API key (loopback only)"))
    # uvicorn catches SIGINT/SIGTERM for its graceful shutdown, then raises the signal again
    # into the handlers it found: these record it, so the workers still save their jobs below.
    stopped_by: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, _: stopped_by.append(s)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop.set()  # running jobs save their step and go back to the queue
        for loop in loops:
            loop.join(timeout=60)
        for ex in executors:
            if isinstance(ex, LocalExecutor):
                ex.pipe.close()
        if cluster is not None:
            cluster.close()
        store.clear_address()
        say("server stopped")
