"""The HTTP side of `omni serve`: a FastAPI app with OpenAI-compatible routes and the chat page.

    GET  /                     the web chat page (static/index.html)
    GET  /health               {"status": "ok", running, waiting, ...}
    GET  /v1/models            the one served model
    POST /v1/chat/completions  text + image parts in; text + image parts out; SSE with stream=true

Every refusal is a JSON error object ({"error": {"message", "type", "param", "code"}}) with a 4xx
status; an unexpected failure is a 500 that names the request id, never a traceback (that goes
to the server log). One log line per request, written when its last byte is sent.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import os
import secrets
import time
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from omni.serve.engine import (
    Busy,
    Job,
    Turn,
    Worker,
    check_config,
    context_length,
    conversation_prompt,
    default_config,
    prompt_length,
)
from omni.serve.schemas import FINISH, Limits, RequestError, chunk, completion, image_url, parse_request

log = logging.getLogger("omni.serve")
_ids = itertools.count(1)


class AccessLog:
    """ASGI middleware: a request id, and one log line per request once the response is sent."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        rid = f"req-{next(_ids)}-{secrets.token_hex(3)}"
        scope.setdefault("state", {})["rid"] = rid
        scope["state"]["note"] = ""
        status = [500]

        async def logged_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        try:
            await self.app(scope, receive, logged_send)
        finally:
            client = scope.get("client") or ("-", 0)
            log.info("%s %s %s %s %d %.3fs%s", rid, client[0], scope["method"], scope["path"], status[0],
                     time.monotonic() - start, scope["state"].get("note", ""))


def error_response(e: RequestError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def create_app(model, *, model_name: str = "omni", limits: Limits | None = None, api_key: str | None = None,
               worker: Worker | None = None) -> FastAPI:
    """The app serving `model`; the worker thread starts and stops with the app (lifespan)."""
    limits = limits or Limits()
    worker = worker or Worker(model, max_running=limits.max_running, max_waiting=limits.max_waiting)
    ctx = context_length(model)
    n_image = model.image_tokenizer.num_tokens

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        log.info("serving %s (context %d, %d image tokens), at most %d running / %d waiting", model_name, ctx,
                 n_image, limits.max_running, limits.max_waiting)
        yield
        worker.stop()

    app = FastAPI(title="omni", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    app.add_middleware(AccessLog)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError):
        request.state.note = f" error={e.code}"
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        messages = {404: f"no route {request.url.path}; see GET /v1/models, POST /v1/chat/completions",
                    405: f"{request.method} is not allowed on {request.url.path}"}
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return error_response(RequestError(e.status_code, messages.get(e.status_code, str(e.detail)), code=code))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        rid = getattr(request.state, "rid", "?")
        log.exception("%s failed", rid)
        return error_response(RequestError(500, f"internal error (request {rid}); the server log has the details",
                                           code="internal_error", kind="server_error"))

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not given:
            raise RequestError(401, "missing API key; send the header Authorization: Bearer KEY",
                               code="missing_api_key", kind="authentication_error")
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise RequestError(401, "incorrect API key; use the key the server was started with (--api-key)",
                               code="invalid_api_key", kind="authentication_error")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(resources.files("omni.serve").joinpath("static/index.html").read_text("utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **worker.load()}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "omni",
                                            "context_length": ctx, "image_tokens": n_image}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        body = await read_body(request, limits.max_body_bytes)
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the body is not valid JSON ({e}); send one JSON object",
                               code="invalid_json") from None
        req = await run_in_threadpool(parse_request, data, limits)  # base64 / PIL decoding off the loop
        if req.model != model_name:
            raise RequestError(404, f"model {req.model!r} is not served here; this server serves {model_name!r} "
                               "(GET /v1/models)", param="model", code="model_not_found")
        job, n_prompt = make_job(req, request)
        try:
            worker.submit(job)
        except Busy as e:
            request.state.note = " error=busy"
            return error_response(RequestError(429, str(e), code="server_busy", kind="rate_limit_error"),
                                  headers={"Retry-After": str(e.retry_after)})
        rid = request.state.rid
        if req.stream:
            return StreamingResponse(stream(job, rid, n_prompt, req.include_usage, request),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        result = await wait_result(job, request)
        usage = usage_of(n_prompt, result)
        request.state.note = note(n_prompt, result)
        return completion(rid, model_name, result, usage)

    def make_job(req, request: Request) -> tuple[Job, int]:
        try:
            cfg = default_config(model, **req.overrides)
            check_config(cfg, cfg.mode)
        except ValueError as e:
            raise RequestError(400, str(e), code="invalid_settings") from None
        try:
            prompt, mode = conversation_prompt(model.tokenizer, [Turn(role, segs) for role, segs in req.messages],
                                               cfg.mode)
        except ValueError as e:
            raise RequestError(400, str(e), param="messages", code="invalid_image") from None
        n = prompt_length(model, prompt)
        need = n_image + 2 if mode == "image" else 1
        cap = min(limits.max_prompt_tokens or ctx, ctx - need)
        if n > cap:
            raise RequestError(400, f"the prompt takes {n} positions (an image counts {n_image + 2}); this server "
                               f"takes at most {cap}: shorten the conversation or send fewer images",
                               param="messages", code="prompt_too_long")
        seed = req.seed if req.seed is not None else secrets.randbits(31)
        job = Job(id=request.state.rid, prompt=prompt, cfg=cfg, mode=mode, seed=seed,
                  deadline=time.monotonic() + limits.request_timeout, loop=asyncio.get_running_loop())
        return job, n

    async def stream(job: Job, rid: str, n_prompt: int, include_usage: bool, request: Request):
        created = int(time.time())
        k = 0  # images so far

        def sse(delta: dict, finish: str | None = None, **extra) -> str:
            return f"data: {json.dumps(chunk(rid, model_name, created, delta, finish, **extra))}\n\n"

        def encode(kind: str, *args) -> tuple[str, bool]:
            """One event as SSE text, and whether it ends the answer."""
            nonlocal k
            if kind == "text":
                return sse({"content": args[0]}), False
            if kind == "image_start":
                return sse({"image_start": {"index": k, "tokens": args[0]}}), False
            if kind == "image_token":
                return sse({"image_progress": {"index": k, "done": args[0], "total": args[1]}}), False
            if kind == "image":
                k += 1
                part = {"index": k - 1, "type": "image_url", "image_url": {"url": image_url(args[0])}}
                return sse({"image": part}), False
            if kind == "error":
                request.state.note = " error=generation"
                err = RequestError(args[0], args[1], code="generation_failed", kind="server_error")
                return f"data: {json.dumps(err.body())}\n\n", True
            result = args[0]  # done
            request.state.note = note(n_prompt, result)
            extra = {"omni": {"finish_reason": result.finish_reason, "settings": result.settings}}
            text = sse({}, FINISH.get(result.finish_reason, "stop"), **extra)
            if include_usage:
                tail = chunk(rid, model_name, created, {}) | {"choices": [], "usage": usage_of(n_prompt, result)}
                text += f"data: {json.dumps(tail)}\n\n"
            return text + "data: [DONE]\n\n", True

        done = False
        try:
            yield sse({"role": "assistant", "content": ""})
            while not done:
                # One write per decode step (the worker delivers a step's events together), or
                # fewer: whatever piled up while this client was being written to goes out at once.
                steps = [await job.events.get()]
                while not job.events.empty():
                    steps.append(job.events.get_nowait())
                out = []
                for event in (e for step in steps for e in step):
                    text, done = encode(*event)
                    out.append(text)
                    if done:
                        break
                yield "".join(out)
        finally:
            if not done:  # the client went away mid-answer: free its rows
                job.cancelled = True
                request.state.note = " cancelled"

    async def wait_result(job: Job, request: Request):
        while True:
            try:
                events = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled = True
                    request.state.note = " cancelled"
                    raise RequestError(499, "client closed the request", code="client_closed") from None
                continue
            for kind, *args in events:
                if kind == "done":
                    return args[0]
                if kind == "error":
                    raise RequestError(args[0], args[1], code="generation_failed", kind="server_error")

    return app


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) one over `limit` bytes before reading it all."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the body is {declared} bytes, over this server's {limit}; send smaller images",
                           code="body_too_large")
    parts, n = [], 0
    async for piece in request.stream():
        n += len(piece)
        if n > limit:
            raise RequestError(413, f"the body is over this server's {limit} bytes; send smaller images",
                               code="body_too_large")
        parts.append(piece)
    return b"".join(parts)


def usage_of(n_prompt: int, result) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": len(result.ids),
            "total_tokens": n_prompt + len(result.ids)}


def note(n_prompt: int, result) -> str:
    return (f" prompt={n_prompt} completion={len(result.ids)} images={len(result.images)} "
            f"finish={result.finish_reason} seed={result.settings.get('seed')}")


def model_name_of(ckpt: str) -> str:
    return os.path.basename(os.path.normpath(ckpt)) or "omni"
