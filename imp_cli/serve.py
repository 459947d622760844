"""`imp serve`: an OpenAI-compatible HTTP server over one Session.

Shape: uvicorn runs a Starlette app on the event loop; one worker thread owns the Session (the
model, its engine and the prompt cache) and answers jobs one at a time, in the order they were
admitted. The event loop never touches the engine: it parses and checks requests, decodes
images in a small thread pool, queues jobs and relays the worker's text pieces to the client
(server-sent events when `stream` is true). A client that goes away sets its job's cancel flag;
the worker checks it before every token, so the engine is free for the next job at once.

Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}} with the HTTP status
OpenAI uses for the same case.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import ipaddress
import json
import math
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from . import heap, netguard
from .api_errors import ApiError, _bad, _flag, _number
from .errors import ImpError
from .images import ImageError
from .limits import (MAX_DECODE_BYTES, MAX_IMAGE_BYTES, REMOTE_DEADLINE, Limits, LimitError, check_json_values,
                     check_messages, check_parts, check_prompt_bytes, check_stops, check_unicode, json_value_cap)
from .prompts import Turn
from .stats import log_fields
from .stops import StopText

ROLES = ("system", "developer", "user", "assistant")
RETRY_AFTER_MAX = 300
FETCH_SLOTS = 4  # remote fetches at once: apart from the decode slots, so a slow host never holds those
DECODE_SLOTS = 2
PARSE_SLOTS = 2  # large bodies parsed at once (off the event loop)


@dataclass
class ServeOptions:
    model: str | None = None
    mmproj: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_queue: int = 16
    max_body: int = MAX_IMAGE_BYTES
    allow_remote_images: bool = False
    max_tokens: int = 512  # when a request gives none
    temperature: float = 0.0  # when a request gives none
    top_p: float = 1.0  # when a request gives none
    top_k: int = 0  # when a request gives none
    seed: int | None = None  # when a request gives none (None: a fresh random seed per answer)
    system: str | None = None  # when a conversation has no system message (None: the model's own)
    cors_origins: list = field(default_factory=list)  # --cors-origin: browser origins allowed (none: no CORS)
    threads: int = 0
    ctx: int = 4096
    cache: bool = True
    verbose: bool = False
    repack: str = "auto"  # weight repacking / flash attention: auto (imp tune's choice) | on | off
    flash_attn: str = "auto"
    ui: bool = True  # the web page at GET / (imp_cli/web); --no-ui turns it off
    # issue 21: limits, each a 400/408/503 that names it (README: the limits table)
    max_messages: int = Limits.max_messages
    max_parts: int = Limits.max_parts
    max_body_total: int = 0  # request bodies held at once; 0: 3 x max_body
    max_connections: int = netguard.MAX_CONNECTIONS
    header_timeout: float = netguard.HEADER_TIMEOUT
    body_timeout: float = netguard.BODY_TIMEOUT
    keep_alive: float = netguard.KEEP_ALIVE
    remote_timeout: float = REMOTE_DEADLINE
    max_image_memory: int = MAX_DECODE_BYTES

    def limits(self) -> Limits:
        return Limits(max_messages=self.max_messages, max_parts=self.max_parts)

    def body_total(self) -> int:
        return max(self.max_body_total or 3 * self.max_body, self.max_body)


# -- requests ----------------------------------------------------------------------------------
@dataclass
class ChatRequest:
    model: str
    question: str
    history: list[Turn]
    system: str | None
    image_url: str | None
    image_turn: int
    sampling: object  # engine.Sampling
    max_tokens: int
    stop: list[str]
    stream: bool
    include_usage: bool
    constraint: object = None  # response_format: a constrain.Constraint (openai_fields)
    logprobs: int = -1  # -1: none; else top_logprobs alternatives per token


def _content(content, param: str, role: str, parts: list[int], limits: Limits) -> tuple[str, list[str]]:
    """A message's content -> (its text, its image URLs). `parts`: [content parts counted so far]."""
    if isinstance(content, str):
        return content, []
    if content is None and role == "assistant":
        return "", []
    if not isinstance(content, list):
        raise _bad(f"'{param}' must be a string or a list of content parts", param, "invalid_type")
    parts[0] += len(content)
    _checked(check_parts, parts[0], param, limits)
    texts, images = [], []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise _bad(f"'{where}' must be an object", where, "invalid_type")
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise _bad(f"'{where}.text' must be a string", f"{where}.text", "invalid_type")
            texts.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image  # many clients send the URL itself
            if not isinstance(url, str):
                raise _bad(f"'{where}.image_url' must be a URL string or an object with a 'url' string",
                           f"{where}.image_url", "invalid_type")
            if role != "user":
                raise _bad(f"'{where}': only user messages can hold an image", where)
            images.append(url)
        else:
            raise _bad(f"'{where}.type' must be 'text' or 'image_url'", f"{where}.type")
    return "\n".join(texts), images


def _checked(check, *args) -> None:
    """Run one of limits.py's checks; its refusal is a 400 naming the limit."""
    try:
        check(*args)
    except LimitError as e:
        raise _bad(e.message, e.param, e.code) from None


def parse_chat(body: dict, default_max_tokens: int, default_temperature: float,
               limits: Limits = Limits()) -> ChatRequest:
    """The body of POST /v1/chat/completions -> what the Session needs, or an ApiError 400.
    Linear in the body's size (issue 21): the server runs it off the event loop."""
    from .engine import Sampling

    model = body.get("model")
    if model is None:
        raise _bad("you must provide a model parameter", "model", "missing_required_parameter")
    if not isinstance(model, str):
        raise _bad("'model' must be a string", "model", "invalid_type")
    messages = body.get("messages")
    if messages is None:
        raise _bad("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages", "invalid_type")
    _checked(check_messages, messages, limits)

    system: list[str] = []
    # [role, [texts]]: user and assistant alternate; consecutive ones are merged, joined once at
    # the end (a join per message was quadratic: 400,000 messages froze the server for 190 s)
    turns: list[list] = []
    parts = [0]
    image_url, image_turn = None, 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"'{where}' must be an object", where, "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"'{where}.role' must be one of {', '.join(ROLES)}", f"{where}.role")
        if "content" not in m:
            raise _bad(f"'{where}.content' is required", f"{where}.content", "missing_required_parameter")
        text, images = _content(m["content"], f"{where}.content", role, parts, limits)
        if role in ("system", "developer"):
            if images:
                raise _bad(f"'{where}': a system message cannot hold an image", where)
            system.append(text)
            continue
        if turns and turns[-1][0] == role:
            turns[-1][1].append(text)
        else:
            turns.append([role, [text]])
        if images:
            if image_url is not None or len(images) > 1:
                raise _bad("Imp takes one image per conversation; this one has more", where, "too_many_images")
            image_url, image_turn = images[0], len(turns) // 2  # the index of this user turn
    if not turns or turns[0][0] != "user":
        raise _bad("the conversation must start with a user message (after any system messages)", "messages")
    if turns[-1][0] != "user":
        raise _bad("the last message must be a user message", "messages")
    for turn in turns:
        turn[1] = "\n".join(turn[1])
    _checked(check_unicode, [t[1] for t in turns] + system)
    history = [Turn(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns) - 1, 2)]

    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = _flag(options or {}, "include_usage", "stream_options.include_usage")
    if _number(body, "n", 1, 2**31 - 1, integer=True) not in (None, 1):
        raise _bad("'n' must be 1: one answer per request", "n")
    max_tokens = _number(body, "max_completion_tokens", 1, 2**31 - 1, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, 2**31 - 1, integer=True)
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1)
    top_k = _number(body, "top_k", 0, 2**31 - 1, integer=True)  # not OpenAI's; llama.cpp's servers take it
    seed = _number(body, "seed", -2**63, 2**64 - 1, integer=True)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        raise _bad("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if stop is not None:
        _checked(check_stops, stop)
        _checked(check_unicode, stop, "stop")
    sampling = Sampling(
        temperature=default_temperature if temperature is None else float(temperature),
        top_p=1.0 if top_p is None else float(top_p), top_k=top_k or 0,
        seed=seed)  # None: the Session draws a fresh seed, returned with the answer
    return ChatRequest(model, turns[-1][1], history, "\n".join(system) if system else None, image_url,
                       image_turn, sampling, max_tokens or default_max_tokens, [s for s in stop or [] if s],
                       stream, include_usage)


# -- the engine side -----------------------------------------------------------------------------
@dataclass
class Outcome:
    finish_reason: str  # stop | length
    prompt_tokens: int
    completion_tokens: int
    reused_tokens: int  # of the prompt, from the KV cache or the prompt cache (for the log)
    cancelled: bool
    seed: int | None = None  # the seed the answer was sampled with (None: greedy)
    logprobs: dict | None = None  # OpenAI's logprobs object, when asked for
    timings: dict = field(default_factory=dict)  # the answer's, for the log line (stats.log_fields)


@dataclass
class Job:
    request: ChatRequest
    staged: object  # session.Staged or None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def post(self, kind: str, value=None) -> None:
        """From the worker thread: ("start"), ("text", str), ("end", Outcome), ("error", ApiError)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: the server is gone, nobody listens
            pass


class QueueFull(Exception):
    pass


class Scheduler:
    """Jobs in arrival order, one running, at most `max_queue` waiting for it."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._running = False
        self._closed = False

    def waiting(self) -> int:
        return len(self._waiting)

    def full(self) -> bool:
        # An idle engine takes the next job at once: that one does not count as waiting.
        return len(self._waiting) >= self.max_queue + (0 if self._running else 1)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise shutting_down()
            if self.full():
                raise QueueFull()
            self._waiting.append(job)
            self._cond.notify()

    def take(self) -> Job | None:
        """The next job (it is running until done()), or None once closed."""
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            self._running = bool(self._waiting)
            return self._waiting.popleft() if self._waiting else None

    def done(self) -> None:
        with self._cond:
            self._running = False

    def close(self) -> list[Job]:
        """No more jobs; those still waiting are returned (to be refused)."""
        with self._cond:
            self._closed = True
            left = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
            return left

    def refuse_waiting(self) -> None:
        """close(), and answer each job still waiting with a 503."""
        for job in self.close():
            job.post("error", shutting_down())


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", "server_error", "shutting_down")


class Worker(threading.Thread):
    """Owns the Session: loads it, answers jobs one by one, closes it."""

    def __init__(self, options: ServeOptions, output, scheduler: Scheduler):
        super().__init__(name="imp-engine", daemon=True)
        self.options, self.output, self.scheduler = options, output, scheduler
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.session = None
        self.max_token_bytes = 0
        self.seconds_per_job = 5.0  # a running mean, for Retry-After

    def run(self) -> None:
        from .opening import open_session

        o = self.options
        try:
            self.session = open_session(o.model, o.mmproj, self.output, use_cache=o.cache, threads=o.threads,
                                        ctx=o.ctx, verbose=o.verbose, note=self.output.note, repack=o.repack,
                                        flash_attn=o.flash_attn)
            # a bound for refusing an oversized prompt before tokenizing it (limits.check_prompt_bytes)
            self.max_token_bytes = self.session.engine.max_token_bytes()
        except BaseException as e:  # reported by the main thread
            self.error = e
            return
        finally:
            self.ready.set()
        trimmed = 0.0
        try:
            while (job := self.scheduler.take()) is not None:
                t0 = time.perf_counter()
                try:
                    final = self.answer(job)
                except Exception as e:  # the server lives on; this request gets a 500
                    final = ("error", ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))
                # Free the engine before the client hears the end: its next request must not
                # find the engine still taken (a 503 with --max-queue 0).
                self.scheduler.done()
                job.post(*final)
                self.seconds_per_job = 0.8 * self.seconds_per_job + 0.2 * (time.perf_counter() - t0)
                # Freed memory back to the OS (heap.py), off every answer's path: only when nobody
                # waits, and at most once a second (a trim walks the heap: a few ms).
                if not self.scheduler.waiting() and time.monotonic() - trimmed >= 1.0:
                    heap.trim()
                    trimmed = time.monotonic()
        finally:
            self.session.close()

    def answer(self, job: Job) -> tuple[str, object]:
        """Stream the answer's text to the job; returns its final event ("end" or "error"),
        which run() posts once the engine is free."""
        from .engine import Interrupted
        from .record import completion_tokens
        from .session import PromptTooLong

        r = job.request
        if job.cancel.is_set():  # the client left while it waited
            return "end", Outcome("stop", 0, 0, 0, True)
        engine = self.session.engine
        engine.set_interrupt(job.cancel.is_set)  # a client that leaves during the prefill frees the engine at once
        try:
            stream = self.session.answer(job.staged, r.question, r.history, r.system, r.sampling, r.max_tokens,
                                         image_turn=r.image_turn)
        except Interrupted:
            return "end", Outcome("stop", 0, 0, 0, True)
        except PromptTooLong as e:
            return "error", ApiError(400, str(e), code="context_length_exceeded", param="messages")
        except ImpError as e:
            return "error", ApiError(500, str(e), "server_error")
        finally:
            engine.set_interrupt(None)
        job.post("start")
        stopper = StopText(r.stop)
        pieces = iter(stream)
        stopped = False
        sent = 0  # characters of the answer as sent (cut before a stop string)
        try:
            for piece in pieces:
                if job.cancel.is_set():
                    break
                text, stopped = stopper.feed(piece)
                if text:
                    job.post("text", text)
                    sent += len(text)
                if stopped:
                    break
        finally:
            pieces.close()  # stops generation now if we left early; sets stream.result
        if not stopped and (rest := stopper.flush()):
            job.post("text", rest)
            sent += len(rest)
        a = stream.result
        completion = completion_tokens(a)  # as `imp ask --json` counts them (no end-of-turn token)
        finish = "length" if a.finish_reason in ("length", "context") else "stop"
        logprobs = None
        if r.logprobs >= 0:
            from .openai_fields import logprobs_content

            logprobs = logprobs_content(self.session.engine, a.logprobs or [], sent)
        return "end", Outcome(finish, a.prompt_tokens, completion, a.reused_tokens, job.cancel.is_set(), a.seed,
                              logprobs, a.timings)


# -- the HTTP side -------------------------------------------------------------------------------
def _json(obj, status: int = 200, headers: dict | None = None):
    from starlette.responses import Response

    try:
        content = json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a client's text: JSON's \u escapes carry it
        content = json.dumps(obj).encode("ascii")
    return Response(content, status, headers, media_type="application/json")


async def _read_body(request, limit: int, budget: netguard.BodyBudget | None = None, timeout: float | None = None,
                     held: list[int] | None = None) -> bytes:
    """The body, at most `limit` bytes, else 413; all of it within `timeout` seconds, else 408.
    An oversized body is read on (discarded, up to as much again) before answering, so that the
    client reads our 413 instead of a reset. The bytes held are taken from `budget` as they come
    (all at once for a declared length) and counted in held[0]; the caller gives them back."""
    import anyio
    from starlette.requests import ClientDisconnect

    held = held if held is not None else [0]
    too_large = ApiError(413, f"the request body is larger than {limit:,} bytes (see imp serve --max-body)",
                         code="request_too_large")

    def take(n: int) -> None:
        if budget is not None and n > held[0]:
            if not budget.take(n - held[0]):
                raise ApiError(503, f"the server holds {budget.held:,} bytes of request bodies already (imp serve "
                                    "--max-body-total): retry later", "server_error", "server_busy",
                               headers={"Retry-After": "1"})
            held[0] = n

    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > 2 * limit):
        if not declared.isdigit():
            raise _bad("bad Content-Length header")
        raise too_large  # not worth reading: answer now, uvicorn closes the connection
    if declared is not None:
        take(min(int(declared), limit))
    body, received = bytearray(), 0
    try:
        with anyio.fail_after(timeout):
            async for chunk in request.stream():
                received += len(chunk)
                if received <= limit:
                    take(received)
                    body += chunk
                elif received > 2 * limit:
                    break
    except ClientDisconnect:
        raise _bad("the client disconnected while sending the body") from None
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s (imp serve --body-timeout)",
                       code="request_timeout") from None
    if received > limit:
        raise too_large
    return bytes(body)


class Api:
    """The Starlette app and the state its handlers share."""

    def __init__(self, options: ServeOptions, worker: Worker, scheduler: Scheduler, log):
        self.options, self.worker, self.scheduler, self.log = options, worker, scheduler, log
        self.pair = worker.session.pair
        self.model_id = model_id(options.model, options.mmproj, self.pair)
        self.created = int(self.pair.text_path.stat().st_mtime)
        self.limits = options.limits()
        self.bodies = netguard.BodyBudget(options.body_total())
        self._limiters: dict[str, object] = {}  # small thread pools (made on the loop)

    def app(self):
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.routing import Route

        async def api_error(request, exc: ApiError):
            return _json(exc.body(), exc.status, exc.headers)

        async def http_error(request, exc: HTTPException):
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
            message = {404: f"no route {request.method} {request.url.path}",
                       405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
            return _json(ApiError(exc.status_code, message, code=code).body(), exc.status_code, exc.headers)

        async def server_error(request, exc: Exception):
            return _json(ApiError(500, f"internal error: {type(exc).__name__}", "server_error").body(), 500)

        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ]
        open_paths = {"/health"}
        if self.options.ui:
            from . import web

            routes += web.routes(bool(self.options.api_key))
            open_paths |= web.PATHS
        app = Starlette(routes=routes, exception_handlers={ApiError: api_error, HTTPException: http_error,
                                                           Exception: server_error})
        from .openai_fields import with_cors

        return with_cors(Guard(app, self.options.api_key, self.log, open_paths), self.options.cors_origins)

    # -- endpoints ----------------------------------------------------------------------------
    async def health(self, request):
        return _json({"status": "ok"})

    def _model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "imp"}

    async def models(self, request):
        return _json({"object": "list", "data": [self._model_card()]})

    async def model(self, request):
        self._check_model(request.path_params["model"])
        return _json(self._model_card())

    def _check_model(self, name: str) -> None:
        if name != self.model_id:
            shown = "".join(c if c.isprintable() else "?" for c in name[:100]) + ("…" if len(name) > 100 else "")
            raise ApiError(404, f"the model '{shown}' does not exist: this server runs '{self.model_id}'",
                           code="model_not_found", param="model")

    def _limiter(self, name: str, slots: int):
        import anyio

        if name not in self._limiters:
            self._limiters[name] = anyio.CapacityLimiter(slots)
        return self._limiters[name]

    def _parse(self, body: bytes) -> ChatRequest:
        """In a worker thread (issue 21: a 29 MB body of 400,000 messages froze the event loop for
        190 s): JSON, the request's checks, and the prompt's length against the context."""
        n_ctx, token_bytes = self.worker.session.engine.n_ctx, self.worker.max_token_bytes
        _checked(check_json_values, body, json_value_cap(self.limits, n_ctx, token_bytes))
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: absurd nesting
            raise _bad(f"the body is not valid JSON ({str(e)[:200]})", code="invalid_json") from None
        if not isinstance(data, dict):
            raise _bad("the body must be a JSON object", code="invalid_json")
        r = parse_chat(data, self.options.max_tokens, self.options.temperature, self.limits)
        from .openai_fields import accepts_model, apply_defaults

        if not accepts_model(r.model, self.model_id, self.pair):
            self._check_model(r.model)
        apply_defaults(r, data, self.options)
        texts = [r.question, r.system or ""] + [t for turn in r.history for t in (turn.question, turn.answer)]
        _checked(check_prompt_bytes, sum(len(t.encode("utf-8")) for t in texts), n_ctx, token_bytes)
        return r

    def _queue_full(self) -> ApiError:
        wait = self.worker.seconds_per_job * (self.scheduler.waiting() + 1)
        seconds = max(1, min(RETRY_AFTER_MAX, math.ceil(wait)))
        return ApiError(503, f"the server is busy ({self.scheduler.waiting()} requests waiting): retry later",
                        "server_error", "queue_full", headers={"Retry-After": str(seconds)})

    async def chat(self, request):
        import anyio

        if self.scheduler.full():
            raise self._queue_full()  # before reading a body we would not serve
        held = [0]  # bytes of self.bodies this request holds, until its body is parsed
        try:
            body = await _read_body(request, self.options.max_body, self.bodies, self.options.body_timeout, held)
            r = await anyio.to_thread.run_sync(self._parse, body, limiter=self._limiter("parse", PARSE_SLOTS))
            del body
        finally:
            self.bodies.give(held[0])
        staged = await self._stage(r.image_url) if r.image_url is not None else None

        job = Job(r, staged, asyncio.get_running_loop())
        try:
            self.scheduler.submit(job)
        except QueueFull:
            raise self._queue_full() from None
        watcher = asyncio.ensure_future(_watch_disconnect(request, job))
        try:
            kind, value = await job.events.get()  # waits its turn, then the prefill
            if kind == "error":
                raise value
            if kind == "end":  # cancelled before it started: the client is gone
                request.state.note = "client gone"
                return _json({}, 499)
            if r.stream:
                watcher.cancel()  # the streaming response watches for a disconnect itself
                from starlette.responses import StreamingResponse

                return StreamingResponse(self._events(request, job), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            text = []
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    text.append(value)
                elif kind == "error":
                    raise value
                else:
                    break
            self._note(request, value)
            return _json({
                "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text), "refusal": None},
                             "logprobs": value.logprobs, "finish_reason": value.finish_reason}],
                "usage": _usage(value),
                "seed": value.seed,  # not OpenAI's: the seed this answer was sampled with (null: greedy)
            })
        except BaseException:
            job.cancel.set()  # an error or a cancelled handler (shutdown): free the engine
            raise
        finally:
            watcher.cancel()

    async def _events(self, request, job: Job):
        """Server-sent events in OpenAI's chunk format, then `data: [DONE]`."""
        r = job.request
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": self.model_id}

        def chunk(delta: dict, finish=None) -> str:
            obj = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if r.include_usage:
                obj["usage"] = None
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        ended = False
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    yield chunk({"content": value})
                elif kind == "error":  # the status is sent already: an error event ends the stream
                    ended = True
                    yield f"data: {json.dumps(value.body())}\n\n"
                    return
                else:
                    ended = True
                    self._note(request, value)
                    head["seed"] = value.seed  # the last chunks say which seed the answer was sampled with
                    yield chunk({}, value.finish_reason)
                    if r.include_usage:
                        yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(value)})}\n\n"
                    yield "data: [DONE]\n\n"
                    return
        finally:
            if not ended:  # the client went away (or the server stops): stop the generation now
                job.cancel.set()
                await self._settle(request, job)

    async def _settle(self, request, job: Job) -> None:
        """After a disconnect: wait (shielded from the cancellation, bounded) for the worker to
        stop, so that the request's log line says how far it got."""
        import anyio

        request.state.note = "client gone"
        with anyio.CancelScope(shield=True), anyio.move_on_after(30):
            while True:
                kind, value = await job.events.get()
                if kind == "end":
                    self._note(request, value)
                if kind in ("end", "error"):
                    return

    @staticmethod
    def _note(request, outcome: Outcome) -> None:
        request.state.usage = (outcome.prompt_tokens, outcome.completion_tokens, outcome.reused_tokens)
        request.state.timings = outcome.timings
        if outcome.cancelled:
            request.state.note = "client gone"

    async def _stage(self, url: str):
        """Decode (and for http(s), first fetch) the image in small thread pools: fetches have
        their own slots, so hosts that answer slowly never hold the decode slots that data:
        images need (issue 21: two trickling hosts stalled every image request for 90 s)."""
        import anyio

        decoders = self._limiter("decode", DECODE_SLOTS)
        try:
            if url[:5].lower() == "data:":
                return await anyio.to_thread.run_sync(self._load_data, url, limiter=decoders)
            if not url.lower().startswith(("http://", "https://")):
                raise ImageError("the image URL must be a data:image/...;base64 URL (or http(s) with "
                                 "--allow-remote-images)")
            if not self.options.allow_remote_images:
                raise ImageError("image URLs other than data: URLs are refused (start imp serve with "
                                 "--allow-remote-images to fetch http(s) URLs)")
            data = await anyio.to_thread.run_sync(self._fetch, url, limiter=self._limiter("fetch", FETCH_SLOTS))
            return await anyio.to_thread.run_sync(self._load_fetched, url, data, limiter=decoders)
        except ImageError as e:
            raise _bad(str(e), "messages", "invalid_image") from None

    def _load_data(self, url: str):
        from .images import load_data_url
        from .session import stage_image

        return stage_image(self.pair, load_data_url(url, max_bytes=self.options.max_body,
                                                    budget=self.options.max_image_memory))

    def _fetch(self, url: str) -> bytes:
        from .remote import fetch_public

        return fetch_public(url, max_bytes=self.options.max_body, timeout=self.options.remote_timeout)

    def _load_fetched(self, url: str, data: bytes):
        from .images import image_from_bytes, redact
        from .session import stage_image

        shown = redact(url)  # the source recorded (prompt cache) and shown: no query string or fragment
        return stage_image(self.pair, image_from_bytes(data, shown, f"image URL {shown}", f"image URL {shown}",
                                                       self.options.max_image_memory))


def model_id(spec: str | None, mmproj: str | None, pair) -> str:
    """The name clients send as `model`: the store name, or the text GGUF's file name without
    .gguf for a model given by path."""
    from .resolve import resolve

    found = resolve(spec, mmproj)
    return found.name or pair.text_path.stem


def _usage(o: Outcome) -> dict:
    from .openai_fields import usage

    return usage(o)


async def _watch_disconnect(request, job: Job) -> None:
    """Cancel the job when the client disconnects (after its body was read, receive() only
    returns on a disconnect or once the response is complete)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel.set()
            return


class Guard:
    """ASGI wrapper: the API key (every path but /health and the web page's files) and one log
    line per request."""

    def __init__(self, app, api_key: str | None, log, open_paths=frozenset({"/health"})):
        self.app, self.log, self.open_paths = app, log, open_paths
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        state = scope.setdefault("state", {})
        status = [0]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.expected is not None and scope["path"] not in self.open_paths and not self._authorized(scope):
                error = ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await _json(error.body(), 401, error.headers)(scope, receive, sending)
                return
            await self.app(scope, receive, sending)
        finally:
            usage = state.get("usage")
            timings = state.get("timings")
            tokens = (log_fields(timings) if timings else
                      f"prompt {usage[0] - usage[2]} tokens ({usage[2]} reused), answer {usage[1]} tokens" if usage
                      else "-")
            note = f" ({state['note']})" if state.get("note") else ""
            path = "".join(c if c.isprintable() else "?" for c in scope["path"])[:200]
            self.log(f"{scope['method']} {path} {status[0] or '-'} {tokens} "
                     f"{(time.perf_counter() - t0) * 1000:.0f} ms{note}")

    def _authorized(self, scope) -> bool:
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        return hmac.compare_digest(given, self.expected)  # constant time


# -- running it ----------------------------------------------------------------------------------
def _bind(host: str, port: int) -> socket.socket:
    """Bound, not listening yet: a taken port fails before the model loads, and nobody can
    connect (and hang) while it loads."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise ImpError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_serve(options: ServeOptions, output) -> None:
    """Load the model, listen, serve until Ctrl-C or SIGTERM, then finish or cancel what runs and
    return (exit 0)."""
    import uvicorn

    heap.cap_arenas()  # before any thread of the server starts (heap.py says why)
    sock = _bind(options.host, options.port)
    if not _is_loopback(sock.getsockname()[0]) and not options.api_key:
        output.warn(f"listening on {options.host}, not a loopback address, without --api-key: "
                    "anyone who can reach it can use the model")
    scheduler = Scheduler(options.max_queue)
    worker = Worker(options, output, scheduler)
    worker.start()
    worker.ready.wait()
    if worker.error is not None:
        sock.close()
        raise worker.error
    try:
        sock.listen(128)
        host, port = sock.getsockname()[:2]
        api = Api(options, worker, scheduler, output.info)
        shown = f"[{host}]" if ":" in host else host
        ready = (f"imp serve: {api.model_id} on http://{shown}:{port}/v1 "
                 f"(max queue {options.max_queue}{', API key required' if options.api_key else ''})"
                 + (f"; web page: http://{shown}:{port}/" if options.ui else ""))

        # Connection limits (issue 21; netguard.py says what each is): uvicorn's keep-alive
        # timeout, header size cap and concurrency cap, and our h11 protocol with a header
        # timeout and a connection cap (uvicorn has neither).
        protocol = netguard.guarded_h11(options.header_timeout, options.max_connections,
                                        lambda why: options.verbose and output.info(f"connection dropped: {why}"))
        config = uvicorn.Config(api.app(), log_level="info" if options.verbose else "warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=10, server_header=False, http=protocol,
                                timeout_keep_alive=options.keep_alive, limit_concurrency=options.max_connections + 1,
                                h11_max_incomplete_event_size=netguard.MAX_HEADER_BYTES)
        server = _server_class()(config, scheduler, lambda: output.info(ready))
        server.run(sockets=[sock])
    finally:
        scheduler.refuse_waiting()
        worker.join()
    output.info("imp serve: stopped")


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        def __init__(self, config, scheduler: Scheduler, on_ready):
            super().__init__(config)
            self.scheduler, self.on_ready = scheduler, on_ready
            self.loop = None

        async def startup(self, sockets=None):
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets)
            if not self.should_exit:
                self.on_ready()  # signals are ours from here: Ctrl-C stops gracefully, exit 0

        def handle_exit(self, sig, frame) -> None:
            # Refuse the waiting jobs (on the loop: a signal may land while it holds the lock);
            # the running one finishes, or is cancelled when the graceful timeout runs out.
            if self.loop is not None:
                self.loop.call_soon_threadsafe(self.scheduler.refuse_waiting)
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after a graceful stop; a stop on request is exit 0.
            getattr(self, "_captured_signals", []).clear()

    return Server

