"""The job server (runtime/serve/) as users meet it: a real `easyanimate-rt serve`
process on 127.0.0.1 with the shipped model, a real HTTP client (httpx). Videos are
compared with the runtime Pipeline run directly on the same request (same engines,
same thread count: equal frames)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from serving import Server, wait_for

from easyanimate_rt.cli import default_model
from easyanimate_rt.media import read_video

PROMPT = "a red circle moving left on a white background"


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """This module's engine cache: the shipped model's engines built here stay out of the
    session cache, whose first use other tests (the README's quick start) observe."""
    return tmp_path_factory.mktemp("serve-engines")


@pytest.fixture(scope="module")
def args(engines):
    return ("--threads", "1", "--max-steps", "1000", "--checkpoint-every", "10", "--cache-dir", str(engines))


@pytest.fixture(scope="module")
def server(tmp_path_factory, args):
    srv = Server(tmp_path_factory.mktemp("serve") / "store", "--workers", "2", "--max-queue", "40", *args)
    yield srv
    code = srv.stop()
    assert code == 0, (code, srv.output())


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def pipe(server, engines):  # after the server: it built the engines
    from easyanimate_rt.runtime.pipeline import Pipeline

    return Pipeline.from_pretrained(default_model(), threads=1, cache_dir=engines)


def direct(pipe, tmp_path, request: dict):
    """The Pipeline's frames for the server's stored request."""
    out = tmp_path / f"direct-{request['seed']}-{request['steps']}.mp4"
    pipe.generate_to(out, pipe.request(**request))
    return read_video(out)[0]


def content(client, job_id: str, tmp_path):
    r = client.get(f"/v1/videos/{job_id}/content")
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4", r.text
    path = tmp_path / f"{job_id}.mp4"
    path.write_bytes(r.content)
    return read_video(path)[0]


def events(client, job_id: str) -> list[tuple[str, dict]]:
    found, kind = [], None
    with client.stream("GET", f"/v1/videos/{job_id}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                found.append((kind, json.loads(line.split(":", 1)[1])))
    return found


def test_submit_progress_content_equals_the_pipeline(client, pipe, tmp_path):
    r = client.post("/v1/videos", json={"prompt": PROMPT, "seed": 7})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] in ("queued", "in_progress") and job["id"].startswith("vid_")
    assert job["request"]["steps"] == pipe.config.sampling.steps and job["request"]["seed"] == 7
    seen = events(client, job["id"])
    steps = [e["progress"]["step"] for _, e in seen]
    assert steps == sorted(steps) and steps[-1] == job["progress"]["total_steps"] == 25
    assert seen[-1][0] == "completed" and len(seen) >= 5  # an event per step it saw, then the end
    done = client.get(f"/v1/videos/{job['id']}").json()
    assert done["status"] == "completed" and done["progress"]["percent"] == 100.0
    assert done["timings"]["denoise"] > 0 and done["finished_at"] >= done["started_at"] >= done["created_at"]
    np.testing.assert_array_equal(content(client, job["id"], tmp_path), direct(pipe, tmp_path, done["request"]))


def test_concurrent_submissions_idempotency_and_queue_positions(client):
    ids: dict[int, str] = {}
    barrier = threading.Barrier(16)

    def submit(k: int) -> None:
        barrier.wait()
        r = client.post("/v1/videos", json={"prompt": f"a blue square moving up {k}", "seed": k, "steps": 8},
                        headers={"Idempotency-Key": f"conc-{k}"})
        assert r.status_code == 202, r.text
        ids[k] = r.json()["id"]

    threads = [threading.Thread(target=submit, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    listing = client.get("/v1/videos", params={"status": "queued", "limit": 100}).json()["data"]
    for t in threads:
        t.join()
    positions = [j["queue_position"] for j in sorted(listing, key=lambda j: j["created_at"])]
    assert positions == list(range(1, len(positions) + 1))  # one snapshot: 1..n in submission order
    again = client.post("/v1/videos", json={"prompt": "a blue square moving up 3", "seed": 3, "steps": 8},
                        headers={"Idempotency-Key": "conc-3"})
    assert again.status_code == 200 and again.json()["id"] == ids[3]  # a retry: the same job, not a new one
    assert len(set(ids.values())) == 16
    jobs = [wait_for(client, i, timeout=180) for i in ids.values()]
    assert {j["status"] for j in jobs} == {"completed"}
    assert {j["worker"] for j in jobs} == {"w0", "w1"}  # both workers took jobs
    assert all(j["attempts"] == 1 for j in jobs)  # none run twice
    page1 = client.get("/v1/videos", params={"limit": 10}).json()
    page2 = client.get("/v1/videos", params={"limit": 10, "after": page1["next_after"]}).json()
    listed = [j["id"] for j in page1["data"] + page2["data"]]
    assert page1["has_more"] and len(listed) == len(set(listed)) and set(ids.values()) <= set(listed)


def test_cancel_takes_effect_at_the_next_step(client, tmp_path):
    job = client.post("/v1/videos", json={"prompt": PROMPT, "seed": 1, "steps": 1000}).json()
    running = wait_for(client, job["id"], statuses=(), step=20)
    assert client.get(f"/v1/videos/{job['id']}/content").status_code == 409
    t = time.perf_counter()
    r = client.post(f"/v1/videos/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["cancel_requested"]
    done = wait_for(client, job["id"], timeout=30)
    elapsed = time.perf_counter() - t
    step_time = (running["progress"]["step"] and (time.time() - running["started_at"]) / running["progress"]["step"])
    assert done["status"] == "cancelled" and done["progress"]["step"] < 1000
    assert elapsed < 0.5 + 3 * step_time, (elapsed, step_time)
    after = client.post("/v1/videos", json={"prompt": PROMPT, "seed": 2, "steps": 4}).json()
    assert wait_for(client, after["id"], timeout=60)["status"] == "completed"  # the worker is free again
    assert client.post(f"/v1/videos/{after['id']}/cancel").status_code == 409  # nothing left to cancel
    assert client.get(f"/v1/videos/{job['id']}/content").status_code == 409
    assert client.delete(f"/v1/videos/{after['id']}").json()["deleted"]
    assert client.get(f"/v1/videos/{after['id']}").status_code == 404


BAD = [
    # (body or raw bytes, the rule the message must name)
    ({"prompt": 5}, "prompt: Input should be a valid string"),
    ({}, "prompt: Field required"),
    ({"prompt": "x", "height": "64"}, "height: Input should be a valid integer"),
    ({"prompt": "x", "height": 40}, "height must be a positive multiple of 32, got 40"),
    ({"prompt": "x", "width": 72}, "width must be a positive multiple of 32, got 72"),
    ({"prompt": "x", "frames": 15}, "frames must be 1, a multiple of 8 or a multiple of 8 plus 1, got 15"),
    ({"prompt": "x", "steps": 0}, "steps must be an integer >= 1, got 0"),
    ({"prompt": "x", "sampler": "heun"}, "unknown sampler 'heun'; known samplers"),
    ({"prompt": "x", "guidance_scale": 500.0}, "guidance_scale must be a finite number in [0, 100.0]"),
    ({"prompt": "x", "seed": -1}, "seed must be an integer in [0, 2**64)"),
    ({"prompt": "x", "seed": 1.5}, "seed: Input should be a valid integer"),
    ({"prompt": "x", "colour": "red"}, "colour: Extra inputs are not permitted"),
    ({"prompt": "x", "frames": 289}, "frames must be at most 144 (server limit), got 289"),
    ({"prompt": "x", "steps": 5000}, "steps must be at most 1000 (server limit), got 5000"),
    ({"prompt": "x", "height": 2048}, "height must be at most 1024 (server limit), got 2048"),
    ({"prompt": "x" * 2001}, "prompt must be at most 2000 characters (server limit), got 2001"),
    (b"{not json", "the request body must be JSON"),
    (b"[1, 2]", "the request body must be a JSON object, got list"),
]


@pytest.mark.parametrize("body,rule", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_are_400_naming_the_rule(client, body, rule):
    r = client.post("/v1/videos", **({"content": body} if isinstance(body, bytes) else {"json": body}))
    assert r.status_code == 400, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["type"] == "invalid_request" and rule in err["message"], err


def test_other_errors_and_the_server_stays_up(client):
    r = client.post("/v1/videos", content=json.dumps({"prompt": "x" * 70000}))
    assert r.status_code == 413 and "at most 65536 bytes" in r.json()["error"]["message"]
    for path in ("/v1/videos/vid_000000000000000000000000", "/v1/videos/../../etc/passwd",
                 "/v1/videos/vid_000000000000000000000000/content"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found", (path, r.text)
    r = client.put("/v1/videos")
    assert r.status_code == 405 and r.json()["error"]["type"] == "method_not_allowed"
    assert client.post("/v1/videos/nope/cancel").status_code == 404
    assert client.delete("/v1/videos/nope").status_code == 404
    r = client.get("/v1/videos", params={"limit": 0})
    assert r.status_code == 400 and "limit must be in [1, 100], got 0" in r.json()["error"]["message"]
    assert client.get("/v1/videos", params={"status": "done"}).status_code == 400
    first = client.post("/v1/videos", json={"prompt": "a", "steps": 2}, headers={"Idempotency-Key": "k1"})
    clash = client.post("/v1/videos", json={"prompt": "b", "steps": 2}, headers={"Idempotency-Key": "k1"})
    assert first.status_code == 202 and clash.status_code == 409
    assert "used for a different request" in clash.json()["error"]["message"]
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    text = metrics.text
    for name in ("easyanimate_rt_queue_length", 'easyanimate_rt_jobs{status="completed"}',
                 "easyanimate_rt_step_seconds_count", 'easyanimate_rt_engine_load_seconds{worker="w0"}'):
        assert name in text, name
    assert client.get("/healthz").json()["status"] == "ok"


def test_a_retry_without_a_seed_is_the_same_job(client):
    """Idempotency-Key matches the body the client sent, not the request with the seed the
    server drew: retries racing the first submission all get its job."""
    body = {"prompt": "a purple dot, no seed given", "steps": 2}
    barrier = threading.Barrier(8)
    replies: list = []

    def submit() -> None:
        barrier.wait()
        replies.append(client.post("/v1/videos", json=body, headers={"Idempotency-Key": "no-seed"}))

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status_code for r in replies) == [200] * 7 + [202], [r.text for r in replies]
    ids = {r.json()["id"] for r in replies}
    assert len(ids) == 1 and len({r.json()["request"]["seed"] for r in replies}) == 1
    again = client.post("/v1/videos", json={**body, "seed": None}, headers={"Idempotency-Key": "no-seed"})
    assert again.status_code == 200 and again.json()["id"] in ids  # null is the field left out
    other = client.post("/v1/videos", json={**body, "steps": 3}, headers={"Idempotency-Key": "no-seed"})
    assert other.status_code == 409, other.text
    assert f"was used for a different request (job {ids.pop()})" in other.json()["error"]["message"]


HOSTILE = [
    # (method, path, body, headers, what the 400's message must say)
    ("POST", "/v1/videos", b"[" * 30000, {}, "at most 32 levels deep, got 30000"),
    ("POST", "/v1/videos", b'{"a":' * 10000 + b"1" + b"}" * 10000, {}, "at most 32 levels deep, got 10000"),
    ("POST", "/v1/videos", b'{"prompt": "x", "a": ' + b"[" * 33 + b"]" * 33 + b"}", {}, "levels deep, got 34"),
    ("POST", "/v1/videos", b'{"prompt": "\\\"' + b"[" * 100 + b'", "colour": 1}', {},
     "colour: Extra inputs are not permitted"),  # brackets in a string (after an escaped quote) do not nest
    ("POST", "/v1/videos", b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", {}, "the request body must be JSON"),
    ("POST", "/v1/videos", b'{"prompt": "\xff\xfe"}', {}, "the request body must be JSON"),
    ("POST", "/v1/videos", b'{"prompt": "a\\ud800b", "steps": 2}', {},
     "prompt must be Unicode text (no unpaired surrogates), got '\\ud800' at index 1"),
    ("POST", "/v1/videos", b'{"prompt": "x", "negative_prompt": "\\udfff"}', {}, "negative_prompt must be Unicode"),
    ("POST", "/v1/videos", b"prompt=x&steps=2", {"Content-Type": "application/x-www-form-urlencoded"},
     "the request body must be JSON"),
    ("POST", "/v1/videos", b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n--b--\r\n',
     {"Content-Type": "multipart/form-data; boundary=b"}, "the request body must be JSON"),
    ("POST", "/v1/videos", b'{"prompt": ' + b"[1, " * 30 + b"1" + b"]" * 30 + b"}", {},
     "prompt: Input should be a valid string, got [1, [1, [1, "),
    ("GET", "/v1/videos?limit=abc", None, {}, "limit: Input should be a valid integer"),
    ("GET", "/v1/videos?limit=1e3", None, {}, "limit: Input should be a valid integer"),
    ("GET", "/v1/videos?limit=1" + "0" * 5000, None, {}, "limit: "),
    ("GET", "/v1/videos?limit=%ff", None, {}, "limit: Input should be a valid integer"),
    ("GET", "/v1/videos?status=%ff%fe", None, {}, "status must be one of"),
]


def test_hostile_inputs_are_400_and_leave_no_traceback(server, client):
    seen = len(server.output())
    for method, path, body, headers, rule in HOSTILE:
        r = client.request(method, path, content=body, headers=headers)
        assert r.status_code == 400, (path, body[:80] if body else None, r.status_code, r.text[:300])
        err = r.json()["error"]
        assert err["type"] == "invalid_request" and rule in err["message"], (rule, err)
        assert len(err["message"]) < 400, err  # a hostile input is not echoed whole
    assert client.get("/healthz").json()["status"] == "ok"
    log = server.output()[seen:]
    assert "Traceback" not in log and "Exception" not in log, log[-3000:]


def test_a_full_queue_is_429(tmp_path, args):
    srv = Server(tmp_path / "store", "--max-queue", "2", *args)
    try:
        with srv.client() as c:
            running = c.post("/v1/videos", json={"prompt": PROMPT, "steps": 1000}).json()
            wait_for(c, running["id"], statuses=(), step=1)
            assert [c.post("/v1/videos", json={"prompt": PROMPT, "steps": 3}).status_code for _ in range(2)] == [202] * 2
            r = c.post("/v1/videos", json={"prompt": PROMPT, "steps": 3})
            assert r.status_code == 429 and r.headers["retry-after"] == "5"
            assert "the queue holds its limit of 2 jobs" in r.json()["error"]["message"]
            assert c.post(f"/v1/videos/{running['id']}/cancel").status_code == 200
    finally:
        assert srv.stop() == 0


def test_off_loopback_needs_an_api_key(tmp_path, engines):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "easyanimate_rt", "serve", "--store", str(tmp_path / "s0"),
                        "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "EASYANIMATE_RT_API_KEY": ""})
    assert r.returncode == 2 and "requires an API key: pass --api-key or set EASYANIMATE_RT_API_KEY" in r.stderr
    assert "Traceback" not in r.stderr
    srv = Server(tmp_path / "store", "--host", "0.0.0.0", "--threads", "1", "--cache-dir", str(engines), env={"EASYANIMATE_RT_API_KEY": "s3cret"})
    try:
        port = srv.url.rsplit(":", 1)[1]
        with srv.client() as c:
            c.base_url = f"http://127.0.0.1:{port}"
            assert c.get("/healthz").status_code == 200  # liveness needs no key
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}):
                r = c.get("/v1/videos", headers=headers)
                assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized", headers
            r = c.post("/v1/videos", json={"prompt": "x", "steps": 2})
            assert r.status_code == 401 and "an API key is required" in r.json()["error"]["message"]
            assert c.get("/v1/videos", headers={"Authorization": "Bearer s3cret"}).status_code == 200
            assert c.get("/metrics", headers={"X-API-Key": "s3cret"}).status_code == 200
    finally:
        assert srv.stop() == 0


def test_sigkill_mid_job_resumes_from_its_checkpoint(tmp_path, pipe, args):
    """Killed mid-job, restarted on the same store: the job goes on from its last
    checkpoint, its video equals an uninterrupted run's, the queued jobs still run."""
    store = tmp_path / "store"
    srv = Server(store, *args)
    with srv.client() as c:
        long = c.post("/v1/videos", json={"prompt": PROMPT, "seed": 11, "steps": 300}).json()
        queued = [c.post("/v1/videos", json={"prompt": "a green triangle", "seed": k, "steps": 5}).json()
                  for k in range(2)]
        at_kill = wait_for(c, long["id"], statuses=(), step=45)["progress"]["step"]
    srv.kill()
    assert srv.proc.returncode == -9
    srv = Server(store, *args)
    try:
        assert "1 job(s) a stopped server left running are back in the queue" in srv.output()
        with srv.client() as c:
            done = wait_for(c, long["id"], timeout=180)
            assert done["status"] == "completed" and done["attempts"] == 2
            assert 40 <= done["resumed_from_step"] <= at_kill and done["resumed_from_step"] % 10 == 0
            assert done["timings"]["resumed_from"] == done["resumed_from_step"]
            for q in queued:
                assert wait_for(c, q["id"], timeout=60)["status"] == "completed"
            np.testing.assert_array_equal(content(c, long["id"], tmp_path), direct(pipe, tmp_path, done["request"]))
    finally:
        assert srv.stop() == 0


def test_sigterm_requeues_the_running_job_at_its_step(tmp_path, args):
    store = tmp_path / "store"
    srv = Server(store, *args)
    with srv.client() as c:
        job = c.post("/v1/videos", json={"prompt": PROMPT, "seed": 3, "steps": 1000}).json()
        wait_for(c, job["id"], statuses=(), step=15)
    assert srv.stop() == 0  # graceful: the running job saved the step it reached
    from easyanimate_rt.runtime.serve.store import JobStore

    saved = JobStore(store)
    row = saved.get(job["id"])
    step, _ = saved.checkpoint(job["id"])
    assert row.status == "queued" and step == row.step >= 15  # not rounded down to a multiple of 10
    assert row.attempts == 0  # a clean stop costs the job no attempt


def test_a_job_running_at_every_crash_fails_after_its_attempts(tmp_path):
    """recover() at start-up: a job in progress when a server died goes back to the
    queue with its checkpoint, until it has been running at MAX_ATTEMPTS crashes."""
    from easyanimate_rt.runtime.serve.jobs import MAX_ATTEMPTS
    from easyanimate_rt.runtime.serve.store import JobStore

    store = JobStore(tmp_path / "store")
    poison, _ = store.submit({"prompt": "a"}, 10)
    other, _ = store.submit({"prompt": "b"}, 10)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        assert store.claim("w0").id == poison.id
        store.save_checkpoint(poison.id, attempt, b"state")
        if attempt == 1:
            store.requeue(poison.id, failed_attempt=False)  # a clean stop in between: not counted
            assert store.claim("w0").id == poison.id
        requeued, failed = store.recover(MAX_ATTEMPTS)  # the server died mid-job
        if attempt < MAX_ATTEMPTS:
            assert (requeued, failed) == (1, 0) and store.checkpoint(poison.id) == (attempt, b"state")
    job = store.get(poison.id)
    assert (requeued, failed) == (0, 1) and job.status == "failed" and job.attempts == MAX_ATTEMPTS
    assert f"on each of its {MAX_ATTEMPTS} attempts" in job.error and store.checkpoint(poison.id) is None
    assert store.claim("w0").id == other.id  # the queue goes on


def test_ray_serve_replicas_serve_jobs_through_the_same_api(tmp_path, pipe, args):
    """`serve --ray`: a local Ray instance, the workers as 2 CPU Ray Serve replicas; the
    same API and store in front. 4 jobs complete on both replicas, a video equals the
    Pipeline's, and a cancel reaches the replica running the job."""
    srv = Server(tmp_path / "store", "--ray", "--replicas", "2", *args, env={"RAY_USAGE_STATS_ENABLED": "0"})
    try:
        assert "Ray Serve: 2 replica(s) on CPU" in srv.output()
        with srv.client() as c:
            ids = [c.post("/v1/videos", json={"prompt": f"a yellow circle moving down {k}", "seed": k, "steps": 6}
                          ).json()["id"] for k in range(4)]
            done = [wait_for(c, i, timeout=120) for i in ids]
            assert [j["status"] for j in done] == ["completed"] * 4, [j["error"] for j in done]
            assert len({j["timings"]["replica"] for j in done}) == 2  # both replicas took jobs
            np.testing.assert_array_equal(content(c, ids[2], tmp_path), direct(pipe, tmp_path, done[2]["request"]))
            long = c.post("/v1/videos", json={"prompt": PROMPT, "seed": 5, "steps": 1000}).json()["id"]
            wait_for(c, long, statuses=(), step=5)
            assert c.post(f"/v1/videos/{long}/cancel").status_code == 200
            assert wait_for(c, long, timeout=30)["status"] == "cancelled"
            after = c.post("/v1/videos", json={"prompt": PROMPT, "seed": 6, "steps": 4}).json()["id"]
            assert wait_for(c, after, timeout=60)["status"] == "completed"  # the replicas still serve
    finally:
        assert srv.stop() == 0, srv.output()
