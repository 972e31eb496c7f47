"""The HTTP job API (FastAPI) over the job store.

    POST   /v1/videos                 submit (202); Idempotency-Key makes a retry return the same job
    GET    /v1/videos                 list, newest first (?limit=, ?after=ID, ?status=)
    GET    /v1/videos/{id}            status, progress, queue position, error, timings, times
    GET    /v1/videos/{id}/events     server-sent events: the same record at every step, to the end
    GET    /v1/videos/{id}/content    the mp4 (409 until completed)
    POST   /v1/videos/{id}/cancel     cooperative: at the next denoising-step boundary
    DELETE /v1/videos/{id}            the job and its file
    GET    /healthz                   liveness (no API key)
    GET    /metrics                   Prometheus text

Imported only by the server (fastapi is the [serve] extra). Every error is JSON,
``{"error": {"type": ..., "message": ...}}``, the message naming the rule and the value;
bad requests are 400, an over-long body 413, a full queue 429. A client's input never
reaches a parser that can fail in an unplanned way: the body's size and nesting depth
are checked on the raw bytes before it is parsed as JSON.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import threading
from typing import Any, Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...errors import EasyAnimateError, InputError
from ...reference.config import ModelConfig
from .jobs import Limits, LoraLibrary, body_model, resolve_request
from .metrics import Metrics
from .store import FINAL, STATUSES, Conflict, Job, JobStore, QueueFull

MAX_PAGE = 100
MAX_DEPTH = 32  # JSON nesting of a request body (a valid one nests 1 deep); json.loads recurses per level
JSON_SPECIAL = re.compile(rb'["\\\[\]{}]')


class NotFound(EasyAnimateError):
    pass


class Unauthorized(EasyAnimateError):
    pass


class TooLarge(EasyAnimateError):
    pass


ERRORS = ((NotFound, 404, "not_found"), (Unauthorized, 401, "unauthorized"), (TooLarge, 413, "too_large"),
          (QueueFull, 429, "queue_full"), (Conflict, 409, "conflict"), (InputError, 400, "invalid_request"))


def nesting_depth(body: bytes) -> int:
    """How deep JSON arrays and objects nest in ``body``, brackets inside strings not
    counted; a scan of the raw bytes, so it cannot fail however the body is built."""
    depth = deepest = 0
    in_string, escaped = False, -1
    for found in JSON_SPECIAL.finditer(body):
        i = found.start()
        if i == escaped:
            continue
        c = body[i:i + 1]
        if in_string:
            if c == b"\\":
                escaped = i + 1
            elif c == b'"':
                in_string = False
        elif c == b'"':
            in_string = True
        elif c in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in b"]}":
            depth -= 1
    return deepest


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print (sys.get_int_max_str_digits)
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def job_json(job: Job, store: JobStore) -> dict[str, Any]:
    return {
        "id": job.id, "object": "video", "status": job.status,
        "progress": {"step": job.step, "total_steps": job.total_steps,
                     "percent": round(100.0 * job.step / job.total_steps, 1)},
        "queue_position": store.queue_position(job), "error": job.error, "timings": job.timings,
        "created_at": job.created, "started_at": job.started, "finished_at": job.finished,
        "request": job.request, "worker": job.worker, "attempts": job.attempts, "resumed_from_step": job.resumed_from,
        "cancel_requested": job.cancel_requested,
        "content_url": f"/v1/videos/{job.id}/content" if job.status == "completed" else None,
    }


def create_app(store: JobStore, config: ModelConfig, limits: Limits, *, api_key: str | None = None,
               max_queue: int = 64, wake: threading.Event | None = None, metrics: Metrics | None = None,
               info: dict[str, Any] | None = None, loras: LoraLibrary | None = None):
    """The API over ``store``: routes, authorisation (``api_key``), JSON errors; ``loras``:
    the adapters requests may name."""
    metrics = metrics or Metrics(store)
    app = FastAPI(title="easyanimate-rt", summary="text-to-video jobs on the easyanimate-rt runtime")
    _error_handlers(app)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "model": config.name, **(info or {})}

    api = APIRouter(dependencies=[Depends(_authoriser(api_key))])
    _submit_route(api, store, config, limits, max_queue, wake, loras)
    _job_routes(api, store)

    @api.get("/metrics")
    def prometheus():
        data, kind = metrics.render()
        return Response(data, media_type=kind)

    app.include_router(api)
    return app


def error(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


def _error_handlers(app) -> None:
    """Every error as JSON ``{"error": {"type", "message"}}``: the package's errors by class
    (ERRORS), routing errors (404, 405) and FastAPI's validation errors (400)."""

    @app.exception_handler(EasyAnimateError)
    async def known(_, exc: EasyAnimateError):
        for cls, status, kind in ERRORS:
            if isinstance(exc, cls):
                headers = {"Retry-After": "5"} if status == 429 else None
                headers = {"WWW-Authenticate": "Bearer"} if status == 401 else headers
                return error(status, kind, str(exc), headers)
        return error(500, "server_error", str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def routing(_, exc: StarletteHTTPException):  # no such route (404), wrong method (405)
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = "no such route" if exc.status_code == 404 else str(exc.detail)
        return error(exc.status_code, kind, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
        return error(400, "invalid_request", f"{where}: {first.get('msg')}, got {shown(first.get('input'))}")


def _authoriser(api_key: str | None) -> Callable[[Request], None]:
    """The routes' dependency: nothing without a key; else Bearer or X-API-Key, compared
    in constant time."""

    def authorised(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not token:
            raise Unauthorized("an API key is required: send 'Authorization: Bearer KEY' (or 'X-API-Key: KEY')")
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise Unauthorized("the API key is wrong")

    return authorised


async def _read_body(request: Request, limits: Limits) -> dict:
    """The request's JSON object, its size and nesting bounded before it is parsed."""
    length = request.headers.get("content-length")
    if length is not None and length.isascii() and length.isdigit() and int(length) > limits.max_body_bytes:
        raise TooLarge(f"the request body must be at most {limits.max_body_bytes} bytes (server limit), "
                       f"got {length}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_body_bytes:
            raise TooLarge(f"the request body must be at most {limits.max_body_bytes} bytes (server limit)")
    # as few brackets as the limit cannot nest past it: an ordinary body skips the scan (a Python loop)
    depth = nesting_depth(bytes(body)) if body.count(b"[") + body.count(b"{") > MAX_DEPTH else 0
    if depth > MAX_DEPTH:
        raise InputError(f"the request body must nest JSON arrays and objects at most {MAX_DEPTH} levels deep, "
                         f"got {depth}")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, an over-long integer
        raise InputError(f"the request body must be JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"the request body must be a JSON object, got {type(data).__name__}")
    return data


def _submit_route(api, store: JobStore, config: ModelConfig, limits: Limits, max_queue: int,
                  wake: threading.Event | None, loras: LoraLibrary | None = None) -> None:
    VideoRequest = body_model()

    @api.post("/v1/videos", status_code=202)
    async def submit(request: Request):
        data = await _read_body(request, limits)
        try:
            fields = VideoRequest.model_validate(data).model_dump()
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise InputError(f"{where}: {first['msg']}, got {shown(first.get('input'))}") from None
        key = request.headers.get("idempotency-key")
        if key is not None and not 1 <= len(key) <= 255:
            raise InputError(f"Idempotency-Key must be 1 to 255 characters, got {len(key)}")
        resolved, req = resolve_request(fields, config, limits, loras)
        # a retry is matched on the body the client sent, not on the resolved request (whose seed was drawn)
        job, created = await run_in_threadpool(store.submit, resolved, req.calls, key, max_queue, fields)
        if created and wake is not None:
            wake.set()
        return JSONResponse(job_json(job, store), status_code=202 if created else 200,
                            headers={"Location": f"/v1/videos/{job.id}"})


def _job_routes(api, store: JobStore) -> None:
    """Listing, status, progress events, content, cancel and delete of the stored jobs."""

    def find(job_id: str) -> Job:
        job = store.get(job_id)  # an id that is not vid_ + 24 hex digits is never looked up
        if job is None:
            raise NotFound(f"no job with id {job_id!r}")
        return job

    @api.get("/v1/videos")
    def listing(limit: int = 20, after: str | None = None, status: str | None = None) -> dict:
        if not 1 <= limit <= MAX_PAGE:
            raise InputError(f"limit must be in [1, {MAX_PAGE}], got {limit}")
        if status is not None and status not in STATUSES:
            raise InputError(f"status must be one of {list(STATUSES)}, got {status!r}")
        if after is not None:
            find(after)
        with store.snapshot():
            jobs = store.list(limit + 1, after, status)
            page = [job_json(j, store) for j in jobs[:limit]]
        return {"object": "list", "data": page, "has_more": len(jobs) > limit,
                "next_after": page[-1]["id"] if len(jobs) > limit else None}

    @api.get("/v1/videos/{job_id}")
    def status(job_id: str) -> dict:
        return job_json(find(job_id), store)

    @api.get("/v1/videos/{job_id}/events")
    async def events(job_id: str, request: Request):
        await run_in_threadpool(find, job_id)
        return EventSourceResponse(_event_stream(store, job_id, request))

    @api.get("/v1/videos/{job_id}/content")
    def content(job_id: str):
        job = find(job_id)
        if job.status != "completed":
            raise Conflict(f"job {job_id} is {job.status}; its video is there once it is completed")
        path = store.output(job_id)
        if not path.exists():
            raise NotFound(f"job {job_id}'s video is missing from the store")
        return FileResponse(path, media_type="video/mp4", filename=f"{job_id}.mp4")

    @api.post("/v1/videos/{job_id}/cancel")
    def cancel(job_id: str) -> dict:
        find(job_id)
        job = store.cancel(job_id)
        if job is None:  # deleted since
            raise NotFound(f"no job with id {job_id!r}")
        return job_json(job, store)

    @api.delete("/v1/videos/{job_id}")
    def delete(job_id: str) -> dict:
        find(job_id)
        if not store.delete(job_id):  # deleted since
            raise NotFound(f"no job with id {job_id!r}")
        return {"id": job_id, "object": "video", "deleted": True}


async def _event_stream(store: JobStore, job_id: str, request: Request):
    """Server-sent events: one per change of status, step or queue position, to the end."""
    last = None
    while True:
        job = await run_in_threadpool(store.get, job_id)
        if job is None:
            yield {"event": "deleted", "data": json.dumps({"id": job_id})}
            return
        record = job_json(job, store)
        seen = (job.status, job.step, record["queue_position"])
        if seen != last:
            last = seen
            yield {"event": job.status if job.status in FINAL else "progress", "data": json.dumps(record)}
        if job.status in FINAL or await request.is_disconnected():
            return
        await asyncio.sleep(0.05)
