"""The HTTP API in the OpenAI shape (FastAPI): models, chat and text completions, streaming, health, metrics.

``model`` is an expert's name (pinned), the base's name, or ``auto`` (the router chooses). The
answer's ``model`` is whoever answered; for ``auto`` a ``routing`` object says what the router
chose and how sure it was. Errors use OpenAI's body, ``{"error": {"message", "type", "param",
"code"}}``, with 400 (bad input, too long), 401 (auth), 404 (unknown model), 429 (too many
requests in flight) and 503 (nothing loaded, no router).

The only module of the package that imports FastAPI.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from meswitch.serving.batching import ERROR, LENGTH, Event, GenRequest, SchedulerError
from meswitch.serving.loader import Deployment, LoadError, ModelEntry, ModelManager
from meswitch.serving.metrics import ServingMetrics

log = logging.getLogger(__name__)

AUTO = "auto"
T = TypeVar("T")


@dataclass
class ServerConfig:
    api_key: str | None = None  # bearer token for /v1 and /admin; None: no authentication
    max_prompt_tokens: int | None = None  # None: the model's context minus one
    max_tokens_limit: int = 1024  # the largest max_tokens a request may ask for
    default_max_tokens: int = 256  # chat completions that give none (text completions: 16, as OpenAI)
    max_concurrent: int = 64  # generation requests in flight (queued or running); more get 429
    chars_per_token_limit: int = 32  # a prompt longer than max_prompt_tokens * this is refused before tokenizing


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- request bodies ---------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI parameters we do not use are accepted and ignored

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)  # a 64-bit integer, as torch seeds its generators
    # OpenAI's: subtract penalty * (times the token was generated) / penalty * (generated at all) from its logit
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int]
    echo: bool | None = None
    logprobs: int | None = None


def _text_of(content: str | list[dict[str, Any]] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise APIError(
                400, f"message content parts of type {part.get('type')!r} are not supported", param="messages"
            )
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def _timed(fn, *args):
    """(fn(*args), seconds it took): the router's own time, without the executor's queueing."""
    t0 = time.perf_counter()
    return fn(*args), time.perf_counter() - t0


def render_chat(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the conversation: the tokenizer's chat template, else a plain ``role: content`` layout."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer(text)["input_ids"]


class TextStream:
    """Token ids in, text out: holds back incomplete UTF-8 and anything that may still become a stop string."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.text.endswith("\ufffd"):
            return ""
        for s in self.stops:
            i = self.text.find(s, max(0, self.sent - len(s)))
            if i >= 0:
                self.stopped = True
                self.text = self.text[:i]
                return self._take(len(self.text))
        return self._take(len(self.text) - self.hold)

    def flush(self) -> str:
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece = self.text[self.sent : upto]
        self.sent = upto
        return piece


@dataclass
class _Job:
    """One accepted generation: its deployment (held), expert, request and output state."""

    kind: str  # "chat" | "completion"
    dep: Deployment
    entry: ModelEntry
    req: GenRequest
    queue: asyncio.Queue
    stream: TextStream
    prompt_tokens: int
    routing: dict[str, Any] | None
    id: str
    created: int
    t0: float
    include_usage: bool = False


class Server:
    """The FastAPI app over a ModelManager."""

    def __init__(
        self, manager: ModelManager, config: ServerConfig | None = None, metrics: ServingMetrics | None = None
    ):
        self.manager = manager
        self.config = config or ServerConfig()
        self.metrics = metrics or ServingMetrics()
        self.inflight = 0
        self._jobs: dict[str, _Job] = {}  # the generations in progress, by request id
        self._router_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meswitch-router")
        self.app = self._build()

    # ---- app ---------------------------------------------------------------------------------
    def _build(self) -> FastAPI:
        app = FastAPI(title="meswitch", version="1", docs_url=None, redoc_url=None)
        auth = Depends(self._auth)

        @app.exception_handler(APIError)
        async def api_error(_request: Request, e: APIError):
            return JSONResponse(e.body(), status_code=e.status)

        @app.exception_handler(RequestValidationError)
        async def invalid(request: Request, e: RequestValidationError):
            error = _invalid_body(e, request.headers.get("content-type"))
            return JSONResponse(error.body(), status_code=error.status)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(_request: Request, e: StarletteHTTPException):
            code = "not_found" if e.status_code == 404 else None
            return JSONResponse(APIError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code)

        @app.exception_handler(Exception)
        async def crash(_request: Request, e: Exception):
            log.exception("request failed")
            body = APIError(500, f"internal error: {type(e).__name__}", "server_error").body()
            return JSONResponse(body, status_code=500)

        @app.get("/healthz")
        async def healthz():
            dep = self.manager.current
            if dep is None:
                return JSONResponse({"status": "loading"}, status_code=503)
            report = self.manager.last_report
            return {
                "status": "ok",
                "inflight": self.inflight,
                **dep.describe(),
                "last_reload": None if report is None else asdict(report),
            }

        @app.get("/metrics")
        async def metrics():
            return Response(self.metrics.render(), media_type=self.metrics.content_type)

        @app.get("/v1/models", dependencies=[auth])
        async def models():
            with self._deployment() as dep:
                data = [self._model_card(e) for e in [*dep.experts.values(), dep.base]]
                if dep.router is not None:
                    data.append(
                        {
                            "id": AUTO,
                            "object": "model",
                            "created": dep.base.created,
                            "owned_by": "meswitch",
                            "meswitch": {
                                "kind": "router",
                                "version": dep.router_ref.version,
                                "domains": dep.router.experts,
                            },
                        }
                    )
            return {"object": "list", "data": data}

        @app.post("/v1/chat/completions", dependencies=[auth])
        async def chat(body: ChatBody, request: Request):
            return await self._complete("chat", body, request)

        @app.post("/v1/completions", dependencies=[auth])
        async def completions(body: CompletionBody, request: Request):
            return await self._complete("completion", body, request)

        @app.post("/admin/reload", dependencies=[auth])
        async def reload():
            report = await asyncio.to_thread(self.manager.reload)
            status = 200 if report.error is None else 409
            return JSONResponse(asdict(report), status_code=status)

        return app

    async def _auth(self, request: Request) -> None:
        key = self.config.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(
                401, "missing or invalid API key (send 'Authorization: Bearer <key>')", code="invalid_api_key"
            )

    @contextlib.contextmanager
    def _deployment(self):
        try:
            with self.manager.acquire() as dep:
                yield dep
        except LoadError as e:
            raise APIError(503, str(e), "server_error", code="not_ready") from e

    @staticmethod
    def _model_card(e: ModelEntry) -> dict[str, Any]:
        return {
            "id": e.name,
            "object": "model",
            "created": e.created,
            "owned_by": "meswitch",
            "meswitch": {
                "kind": e.kind,
                "version": e.version,
                "domain": e.domain,
                "tier": e.slot.tier if e.slot is not None else None,
            },
        }

    # ---- generation --------------------------------------------------------------------------
    async def _complete(self, kind: str, body: ChatBody | CompletionBody, request: Request):
        t0 = time.perf_counter()
        endpoint = "chat" if kind == "chat" else "completions"
        if self.inflight >= self.config.max_concurrent:
            self.metrics.requests.labels(endpoint, self._label(body.model), "429").inc()
            raise APIError(
                429,
                f"too many requests in flight (limit {self.config.max_concurrent}); retry later",
                "rate_limit_error",
                code="too_many_requests",
            )
        self.inflight += 1
        self.metrics.inflight.set(self.inflight)
        stack = contextlib.ExitStack()
        try:
            dep = stack.enter_context(self._deployment())
            job = await self._start(kind, body, dep, t0)
            stack.callback(self._cancel_if_running, job)
            self._jobs[job.id] = job
            stack.callback(self._jobs.pop, job.id, None)
        except APIError as e:
            self._finish_request(endpoint, self._label(body.model), str(e.status), t0)
            stack.close()
            raise
        except BaseException:
            self._finish_request(endpoint, self._label(body.model), "500", t0)
            stack.close()
            raise
        if body.stream:
            return StreamingResponse(
                self._sse(job, stack, endpoint),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        status = "499"  # until proven otherwise: the client went away
        try:
            with stack:
                answer = await _unless_disconnected(request, self._whole(job))
                if answer is None:  # nobody to answer; leaving the block cancels the sequence
                    return Response(status_code=499)
                text, finish, error = answer
                if error:
                    status = "500"
                    raise APIError(500, f"generation failed: {error}", "server_error")
                status = "200"
                return self._response(job, text, finish)
        finally:
            self._finish_request(endpoint, job.entry.name, status, t0)

    def _label(self, model: str) -> str:
        """A metrics label for a requested model name: a name the server knows, else one label for all others
        (the client's field verbatim would let any client create unbounded label values)."""
        if model == AUTO:
            return model
        with contextlib.suppress(LoadError), self.manager.acquire() as dep:
            if dep.model(model) is not None:
                return model
        return "unknown"

    def _finish_request(self, endpoint: str, model: str, status: str, t0: float) -> None:
        self.inflight -= 1
        self.metrics.inflight.set(self.inflight)
        self.metrics.requests.labels(endpoint, model, status).inc()
        self.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - t0)

    def cancel_all(self) -> int:
        """Cancel every generation in progress (a server told to stop now): each answers with what it has at the
        next step. Returns how many were cancelled."""
        jobs = list(self._jobs.values())
        for job in jobs:
            self._cancel_if_running(job)
        return len(jobs)

    def _cancel_if_running(self, job: _Job) -> None:
        if not job.req.finished:
            job.dep.scheduler.cancel(job.req)

    async def _start(self, kind: str, body, dep: Deployment, t0: float) -> _Job:
        cfg = self.config
        if body.n not in (None, 1):
            raise APIError(400, "n must be 1: one choice per request", param="n")
        if getattr(body, "logprobs", None):
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if getattr(body, "echo", None):
            raise APIError(400, "echo is not supported", param="echo")
        context = dep.scheduler.max_len
        max_prompt = min(cfg.max_prompt_tokens or context - 1, context - 1)
        field = "messages" if kind == "chat" else "prompt"
        if kind == "chat":
            messages = [{"role": m.role, "content": _text_of(m.content)} for m in body.messages]
            chars = sum(len(m["content"]) for m in messages)
            query = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
        else:
            prompt = body.prompt
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
                if len(prompt) != 1:
                    raise APIError(400, "one prompt per request", param="prompt")
                prompt = prompt[0]
            if isinstance(prompt, list) and not prompt:
                raise APIError(400, "prompt is empty", param="prompt")
            chars = len(prompt) if isinstance(prompt, str) else 0
            query = prompt if isinstance(prompt, str) else ""
        if chars > max_prompt * cfg.chars_per_token_limit:
            raise APIError(
                400,
                f"prompt of {chars} characters is far over the limit of {max_prompt} tokens",
                param=field,
                code="context_length_exceeded",
            )
        routing = None
        if body.model == AUTO:
            entry, routing = await self._route(dep, query)
        else:
            entry = dep.model(body.model)
            if entry is None:
                raise APIError(
                    404,
                    f"model {body.model!r} does not exist; GET /v1/models lists them",
                    code="model_not_found",
                    param="model",
                )
        tok = entry.tokenizer
        if kind == "chat":
            ids = await asyncio.to_thread(render_chat, tok, messages)
        elif isinstance(prompt, str):
            ids = (await asyncio.to_thread(tok, prompt))["input_ids"]
        else:
            ids = list(prompt)
        if not ids:
            raise APIError(400, "the prompt has no tokens", param="prompt")
        if len(ids) > max_prompt:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens; the limit is {max_prompt}",
                param=field,
                code="context_length_exceeded",
            )
        asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if asked is not None and asked > cfg.max_tokens_limit:
            raise APIError(
                400,
                f"max_tokens is {asked}; this server allows at most {cfg.max_tokens_limit}",
                param="max_tokens",
                code="max_tokens_too_large",
            )
        default = cfg.default_max_tokens if kind == "chat" else 16
        max_tokens = asked or max(1, min(default, cfg.max_tokens_limit, context - len(ids)))
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4:
            raise APIError(400, "at most 4 stop sequences", param="stop")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        req = GenRequest(
            prompt=ids,
            slot=entry.slot,
            max_new_tokens=max_tokens,
            on_event=_ignore,  # set below: it cancels the request it belongs to
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop_ids=entry.stop_ids,
            frequency_penalty=body.frequency_penalty or 0.0,
            presence_penalty=body.presence_penalty or 0.0,
        )
        req.on_event = functools.partial(_to_loop, loop, queue, req)
        try:
            dep.scheduler.submit(req)
        except SchedulerError as e:
            raise APIError(400, str(e), code=e.code, param=field if e.param == "prompt" else e.param) from e
        self.metrics.prompt_tokens.labels(entry.name).inc(len(ids))
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        return _Job(
            kind=kind,
            dep=dep,
            entry=entry,
            req=req,
            queue=queue,
            stream=TextStream(tok, stops),
            prompt_tokens=len(ids),
            routing=routing,
            id=f"{prefix}-{uuid.uuid4().hex[:24]}",
            created=int(time.time()),
            t0=t0,
            include_usage=bool((body.stream_options or {}).get("include_usage")),
        )

    async def _route(self, dep: Deployment, query: str) -> tuple[ModelEntry, dict[str, Any]]:
        if dep.router is None:
            raise APIError(
                503,
                "model 'auto' needs a router and none is loaded; name an expert instead",
                "server_error",
                code="router_unavailable",
                param="model",
            )
        loop = asyncio.get_running_loop()
        result, seconds = await loop.run_in_executor(self._router_pool, _timed, dep.router.route, query)
        self.metrics.route_seconds.observe(seconds)
        routing = {
            "domain": result.domain,
            "expert": result.expert,
            "confidence": round(float(result.confidence), 6),
            "fallback": bool(result.fallback),
            "truncated": bool(result.truncated),
            "reason": result.reason,
            "latency_ms": round(seconds * 1000, 3),
        }
        entry = dep.experts.get(result.expert) if result.expert else dep.base
        if entry is None:
            routing.update(fallback=True, reason=f"expert {result.expert!r} is not loaded; the base answers")
            entry = dep.base
        self.metrics.routed.labels(entry.name, str(routing["fallback"]).lower()).inc()
        return entry, routing

    async def _whole(self, job: _Job) -> tuple[str, str | None, str | None]:
        """(text, finish_reason, error) of the whole answer."""
        text, finish, error = "", None, None
        async for piece, fin, err in self._pieces(job):
            text += piece
            finish, error = fin or finish, err or error
        return text, finish, error

    async def _pieces(self, job: _Job) -> AsyncIterator[tuple[str, str | None, str | None]]:
        """(text, finish_reason, error) as tokens arrive; the last item has the finish reason."""
        first = True
        while True:
            ev: Event = await job.queue.get()
            if ev.token is not None:
                if first:
                    self.metrics.first_token_seconds.observe(time.perf_counter() - job.t0)
                    first = False
                self.metrics.completion_tokens.labels(job.entry.name).inc()
                piece = job.stream.push(ev.token)
                if job.stream.stopped:
                    job.dep.scheduler.cancel(job.req)
                    yield piece, "stop", None
                    return
                if piece:
                    yield piece, None, None
            if ev.finish is not None:
                tail = job.stream.flush()
                if ev.finish == ERROR:
                    yield tail, None, ev.error or "unknown error"
                else:
                    yield tail, "length" if ev.finish == LENGTH else "stop", None
                return

    def _usage(self, job: _Job) -> dict[str, int]:
        n = len(job.stream.ids)
        return {"prompt_tokens": job.prompt_tokens, "completion_tokens": n, "total_tokens": job.prompt_tokens + n}

    def _envelope(self, job: _Job, obj: str) -> dict[str, Any]:
        out = {
            "id": job.id,
            "object": obj,
            "created": job.created,
            "model": job.entry.name,
            "system_fingerprint": f"meswitch-g{job.dep.generation}",
        }
        if job.routing is not None:
            out["routing"] = job.routing
        out["meswitch"] = {"version": job.entry.version, "generation": job.dep.generation}
        return out

    def _response(self, job: _Job, text: str, finish: str | None) -> dict[str, Any]:
        if job.kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": None,
            }
            return {**self._envelope(job, "chat.completion"), "choices": [choice], "usage": self._usage(job)}
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {**self._envelope(job, "text_completion"), "choices": [choice], "usage": self._usage(job)}

    def _chunk(self, job: _Job, piece: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if job.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if piece:
                delta["content"] = piece
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {**self._envelope(job, "chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}
        return {**self._envelope(job, "text_completion"), "choices": [choice]}

    async def _sse(self, job: _Job, stack: contextlib.ExitStack, endpoint: str) -> AsyncIterator[bytes]:
        status = "200"
        try:
            if job.kind == "chat":
                yield _sse(self._chunk(job, None, None, role=True))
            async for piece, finish, error in self._pieces(job):
                if error:
                    status = "500"
                    yield _sse(APIError(500, f"generation failed: {error}", "server_error").body())
                    break
                if piece or finish:
                    yield _sse(self._chunk(job, piece, finish))
            if job.include_usage and status == "200":
                obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
                yield _sse({**self._envelope(job, obj), "choices": [], "usage": self._usage(job)})
            yield b"data: [DONE]\n\n"
        except BaseException:  # the client went away (cancellation) or the stream broke
            status = "499" if status == "200" else status
            raise
        finally:
            stack.close()
            self._finish_request(endpoint, job.entry.name, status, job.t0)


def _sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def _invalid_body(e: RequestValidationError, content_type: str | None) -> APIError:
    """OpenAI's 400 for a body that does not validate: the field at fault as ``param``, or, when the body is
    not a JSON object at all (malformed, empty, sent as a form), what is wrong with it and how to send it."""
    first = e.errors()[0] if e.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "JSON decode error")
        return APIError(400, f"the body is not valid JSON: {detail} at character {where}")
    if where:
        return APIError(400, f"{where}: {first.get('msg', 'invalid value')}", param=where)
    if content_type and "json" not in content_type.lower():
        return APIError(400, f"the body must be JSON sent with Content-Type: application/json, not {content_type!r}")
    return APIError(400, f"the body must be a JSON object with the request's fields: {first.get('msg', 'invalid')}")


async def _disconnected(request: Request) -> None:
    """Returns once the client has hung up (the body was read before the handler ran: nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None (``work`` cancelled) if the client hangs up first. uvicorn never cancels a
    handler whose client went away, so an abandoned whole answer would otherwise generate to its max_tokens
    for nobody, holding its batch row and its place under --max-concurrent."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    return task.result() if task in done else None


def _ignore(ev: Event) -> None:
    pass


def _to_loop(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, req: GenRequest, ev: Event) -> None:
    """Hand the scheduler thread's event to the request's handler; once the server's loop is closed (a second
    Ctrl-C stops uvicorn without waiting for answers) nobody waits for it: the sequence is cancelled, quietly,
    rather than the scheduler logging "Event loop is closed" tracebacks for every token of every request."""
    try:
        loop.call_soon_threadsafe(queue.put_nowait, ev)
    except RuntimeError:  # the loop is closed
        req.cancelled = True


# ---- running it ---------------------------------------------------------------------------------


def serve_forever(server: Server, host: str, port: int, shutdown_timeout: float | None = 25.0) -> None:
    """uvicorn serving ``server`` in this (the main) thread until Ctrl-C or SIGTERM, as ``meswitch serve`` runs.

    The first Ctrl-C (or SIGTERM) stops taking requests and waits for the answers in progress (uvicorn's graceful
    shutdown), ``shutdown_timeout`` seconds at most (None: for as long as they take); then, or at a second Ctrl-C,
    they are cut short (:meth:`Server.cancel_all`): each ends at its next step with what it has, and the server
    stops cleanly. The default ends them before an orchestrator's usual 30 s of grace runs out (Kubernetes sends
    SIGKILL then), so that clients get answers, not reset connections. uvicorn's own second Ctrl-C stopped it
    without waiting, cancelling the requests' tasks under them (a traceback for each, and "Event loop is closed"
    from the scheduler thread); a third Ctrl-C still does.
    """
    import signal

    import uvicorn

    class Uvicorn(uvicorn.Server):
        cut = False

        def handle_exit(self, sig: int, frame) -> None:
            if sig == signal.SIGINT and self.should_exit and not self.cut:
                self.cut_short("Ctrl-C again")
                return
            if not self.should_exit and shutdown_timeout is not None:
                timer = threading.Timer(shutdown_timeout, self.cut_short, (f"after {shutdown_timeout:g} s",))
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)

        def cut_short(self, why: str) -> None:
            if not self.cut:
                self.cut = True
                n = server.cancel_all()
                log.warning("%s: %d answers in progress cut short; Ctrl-C again quits at once", why, n)

    Uvicorn(uvicorn.Config(server.app, host=host, port=port, log_level="info")).run()


class ServerThread:
    """uvicorn serving an app from a background thread (tests, benchmarks); the port may be 0 (free port)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off"))
        self.host = host
        self.thread = threading.Thread(target=self.server.run, name="meswitch-uvicorn", daemon=True)

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
