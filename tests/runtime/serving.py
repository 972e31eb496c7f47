"""A real `easyanimate-rt serve` process on 127.0.0.1 for the serving tests and the load
benchmark: started on a free port, found through its store's server.json, stopped
with SIGTERM, interrupted with SIGINT (Ctrl-C), or killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

FINAL = ("completed", "failed", "cancelled")


def default_sigint() -> None:
    """Popen's preexec_fn for a child that may get SIGINT: a shell running the tests in
    the background ignores SIGINT, its children inherit that, and Python then never
    raises KeyboardInterrupt; the child gets the default back, as from a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Server:
    def __init__(self, store: Path, *args: str, env: dict | None = None, wait: float = 240.0):
        self.store = Path(store)
        self.log = open(self.store.parent / f"{self.store.name}.log", "ab")
        cmd = [sys.executable, "-m", "easyanimate_rt", "serve", "--store", str(self.store), "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                     preexec_fn=default_sigint)
        self.url = self._wait_for_address(wait)

    def _wait_for_address(self, wait: float) -> str:
        deadline = time.monotonic() + wait
        address = self.store / "server.json"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            written = json.loads(address.read_text()) if address.exists() else {}
            if written.get("pid") == self.proc.pid:  # not a stale file from an earlier server
                url = written["url"]
                try:
                    if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                        return url
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"the server did not come up in {wait}s:\n{self.output()}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return (self.store.parent / f"{self.store.name}.log").read_text(errors="replace")

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop it with ``sig`` (SIGINT: Ctrl-C); its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()
        return self.proc.returncode


def wait_for(client: httpx.Client, job_id: str, statuses=FINAL, timeout: float = 120.0, step: int | None = None
             ) -> dict:
    """Poll until the job's status is one of ``statuses`` (or it has done ``step`` steps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/videos/{job_id}").json()
        if job["status"] in statuses or (step is not None and job["progress"]["step"] >= step):
            return job
        if job["status"] in FINAL:
            raise AssertionError(f"job {job_id} ended {job['status']} ({job['error']}) before {statuses}/{step}")
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} not {statuses} (step {step}) after {timeout}s: {job}")
